"""The HTTP benchmark's scenarios, and the settings of a run: its options with the scenario's defaults filled in."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fleetserve.bench.errors import BenchError
from fleetserve.bench.load import Load
from fleetserve.bench.workload import DATA_DIR, RESULTS_DIR


@dataclass(frozen=True)
class Scenario:
    """A scenario's prompts file and its defaults."""

    prompts: Path
    max_tokens: int
    concurrency: tuple[int, ...]
    description: str


SCENARIOS: dict[str, Scenario] = {
    "chat": Scenario(DATA_DIR / "prompts.jsonl", 64, (1, 4, 16), "64 chat prompts"),
    "shared-prefix": Scenario(
        DATA_DIR / "shared_prefix.jsonl", 32, (1, 4, 16), "questions after one long shared system prompt"
    ),
    "gateway-overhead": Scenario(
        DATA_DIR / "prompts.jsonl", 64, (16,), "the chat prompts through the gateway and straight to one worker"
    ),
}


@dataclass
class Settings:
    """The options after the scenario's defaults are filled in."""

    scenario: str
    prompts: Path
    max_tokens: int
    loads: list[Load]
    output: Path
    worker: str | None


def resolve(args: argparse.Namespace) -> Settings:
    """Fill in the scenario's defaults; raise BenchError on options that do not fit together."""
    scenario = SCENARIOS[args.scenario]
    worker = getattr(args, "worker", None)
    if args.scenario == "gateway-overhead" and not worker:
        raise BenchError("--scenario gateway-overhead needs --worker HOST:PORT (the gateway's only worker)")
    if args.scenario != "gateway-overhead" and worker:
        raise BenchError("--worker is only used by --scenario gateway-overhead")
    rate = getattr(args, "request_rate", None)
    concurrency = getattr(args, "concurrency", None)
    if rate is not None and concurrency is not None:
        raise BenchError("--concurrency and --request-rate exclude each other")
    if rate is not None:
        loads = [Load(rate=rate)]
    else:
        loads = [Load(concurrency=c) for c in (concurrency or scenario.concurrency)]
    output = getattr(args, "output", None) or RESULTS_DIR / f"http-{args.scenario}.json"
    return Settings(
        scenario=args.scenario,
        prompts=Path(getattr(args, "prompts", None) or scenario.prompts),
        max_tokens=getattr(args, "max_tokens", None) or scenario.max_tokens,
        loads=loads,
        output=Path(output),
        worker=worker,
    )
