"""The HTTP benchmark's command line: its options, and the stand-alone parser of ``benchmarks/http_bench.py``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetserve.bench.arguments import concurrency_list, host_port, positive_float, positive_int
from fleetserve.bench.scenarios import SCENARIOS
from fleetserve.bench.workload import DEFAULT_MODEL

DEFAULT_URL = "http://127.0.0.1:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP benchmark's options to ``parser``."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway's base URL (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="bearer key for the gateway (default: none)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name to ask for (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="chat",
        help="chat: prompts.jsonl, 64 tokens; shared-prefix: shared_prefix.jsonl, 32 tokens; gateway-overhead: the "
        "chat requests through the gateway and straight to --worker over gRPC, at concurrency 16 unless told "
        "(the gateway must have only that one worker registered, for a fair comparison) (default chat)",
    )
    parser.add_argument(
        "--worker",
        type=host_port,
        default=None,
        help="gateway-overhead: HOST:PORT of the worker's gRPC service, the only worker registered with the gateway",
    )
    parser.add_argument("--prompts", type=Path, default=None, help="JSONL prompts file (default: the scenario's)")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=None, help="output tokens per request (default: the scenario's)"
    )
    parser.add_argument(
        "--requests", type=positive_int, default=64, help="requests per level, cycling the prompts (default 64)"
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=None,
        help="comma-separated closed-loop concurrencies, run in turn (default 1,4,16; gateway-overhead: 16)",
    )
    load.add_argument(
        "--request-rate",
        type=positive_float,
        default=None,
        help="open loop instead: Poisson arrivals at this many requests/s",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default 0)")
    parser.add_argument(
        "--timeout", type=positive_float, default=600.0, help="seconds one request may take (default 600)"
    )
    parser.add_argument("--no-warmup", action="store_true", help="send no warm-up request before the first level")
    parser.add_argument(
        "--no-salt",
        action="store_true",
        help="send the prompts unchanged (by default each level and side tags its prompts so that none finds "
        "another's in the prefix cache)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON result file (default benchmarks/results/http-<scenario>.json)"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="also draw latency and throughput per load level to this PNG"
    )


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``benchmarks/http_bench.py``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/http_bench.py",
        description="fleetserve HTTP load generator: streamed chat completions against a gateway. "
        "--scenario gateway-overhead also sends the same requests straight to one worker over gRPC (--worker); "
        "the gateway must have only that worker registered while it runs.",
    )
    add_arguments(parser)
    return parser
