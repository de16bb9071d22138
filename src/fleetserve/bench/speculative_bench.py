"""Speculative decoding (prompt lookup) on and off, engine alone, on chat and on an input-grounded workload.

Two workloads: ``chat`` (``benchmarks/data/prompts.jsonl``) and ``grounded``: each paragraph of the held-out text
(``benchmarks/data/heldout.txt``) with an instruction to copy it with one change, the kind of request (edit or
quote a given text) whose output repeats its input. Greedy, ``ignore_eos``, ``--max-tokens`` tokens. For each
``--dtype``, one engine per setting (``--speculative-tokens`` 0 and K), both run on each workload at each
concurrency in turn; figures: output tokens/s, the ratio on/off, and the share of draft tokens kept.

    python benchmarks/speculative.py [--dtype int4] [--tokens 4] [--concurrency 1,16]

Writes ``benchmarks/results/speculative.json``.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetserve.bench.arguments import concurrency_list, positive_int
from fleetserve.bench.results import cpu_description, created_now, host_environment, write_json
from fleetserve.bench.workload import DATA_DIR, DEFAULT_MODEL, RESULTS_DIR, WARM_UP_TEXT, load_prompts, take

DEFAULT_OUTPUT = RESULTS_DIR / "speculative.json"


def grounded_prompts(text: str) -> list[list[dict]]:
    """One edit request per paragraph of ``text`` (paragraphs of 40 words or more)."""
    paragraphs = [p.strip() for p in text.splitlines() if len(p.split()) >= 40]
    return [
        [{"role": "user", "content": f"Copy this paragraph exactly, but write 'we' instead of 'people':\n\n{p}"}]
        for p in paragraphs
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", help="the engines' --dtype (default auto)")
    parser.add_argument("--tokens", type=positive_int, default=4, help="draft tokens when on (default 4)")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 16], help="levels (default 1,16)")
    parser.add_argument("--requests", type=positive_int, default=16, help="requests per level, at least c (16)")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="output tokens per request (64)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON result (default {DEFAULT_OUTPUT})")


def _engine(args: argparse.Namespace, tokens: int):
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.engine import LLMEngine
    from fleetserve.text.tokenizer import Tokenizer

    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, num_threads=args.threads),
        cache=CacheConfig(enable_prefix_caching=False),
        scheduler=SchedulerConfig(speculative_tokens=tokens),
    )
    engine = LLMEngine(config, progress=False)
    tokenizer = Tokenizer.from_dir(engine.model_dir)
    engine.generate([tokenizer.encode(WARM_UP_TEXT)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.wait_compiled()  # plain decode steps compiled, as served (verifying steps run eagerly)
    return engine, tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fleetserve.bench.engine_loop import run_engine_closed_loop

    workloads = {
        "chat": load_prompts(DATA_DIR / "prompts.jsonl"),
        "grounded": grounded_prompts((DATA_DIR / "heldout.txt").read_text(encoding="utf-8")),
    }
    rows: list[dict[str, Any]] = []
    for tokens in (0, args.tokens):
        engine, tokenizer = _engine(args, tokens)
        for workload, messages in workloads.items():
            ids = [tokenizer.encode_chat(m) for m in messages]
            for c in args.concurrency:
                drafted, kept = engine.spec_draft_tokens, engine.spec_accepted_tokens
                row = {"workload": workload, "speculative_tokens": tokens, "concurrency": c}
                row.update(run_engine_closed_loop(engine, take(ids, max(args.requests, c)), c, args.max_tokens))
                row["draft_tokens"] = engine.spec_draft_tokens - drafted
                row["accepted_tokens"] = engine.spec_accepted_tokens - kept
                rows.append(row)
                print(
                    f"{workload} k={tokens} c={c}: {row['output_tokens_per_s']:.1f} tok/s, "
                    f"{row['accepted_tokens']}/{row['draft_tokens']} drafts kept",
                    flush=True,
                )
        weights = engine.runner.weight_format.name
        del engine
        gc.collect()
    speedups = {}
    for row in rows:
        if row["speculative_tokens"]:
            off = next(
                r
                for r in rows
                if r["workload"] == row["workload"]
                and r["concurrency"] == row["concurrency"]
                and not r["speculative_tokens"]
            )
            name = f"{row['workload']} c={row['concurrency']}"
            speedups[name] = {
                "on_over_off": row["output_tokens_per_s"] / off["output_tokens_per_s"],
                "acceptance": row["accepted_tokens"] / row["draft_tokens"] if row["draft_tokens"] else None,
            }
    result = {
        "benchmark": "speculative",
        "created": created_now(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weights": weights,
        "environment": host_environment(cpu=cpu_description(), torch=torch.__version__),
        "rows": rows,
        "speedups": speedups,
    }
    write_json(Path(args.output), result)
    for name, s in speedups.items():
        acceptance = "-" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        print(f"{name}: {s['on_over_off']:.2f}x with speculation, {acceptance} of drafts kept")
    print(f"results: {args.output}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/speculative.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
