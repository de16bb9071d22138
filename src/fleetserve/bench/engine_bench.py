"""The engine benchmark: the ``chat`` scenario run in-process through LLMEngine, against plain transformers.

Every prompt of ``benchmarks/data/prompts.jsonl`` is a chat; each asks for ``max_tokens`` tokens, greedy, ignoring
EOS, so every request produces exactly ``max_tokens`` tokens. The engine runs a closed loop at each concurrency c:
c requests are kept in the engine, and when one finishes the next prompt is added, until all are done. Each
concurrency gets a freshly built engine (so no scenario reuses the prefix cache another one filled), warmed up with
one short request before the clock starts. The transformers baseline runs ``generate`` one request at a time in a
subprocess of this script, so its peak RSS is its own; it hands its figures back as JSON on stdout.

Run it as ``python benchmarks/engine.py`` (see ``--help``); ``run`` returns the same dict it writes as JSON.
This module owns the command line and the run as a whole; ``engine_loop`` runs the engine rows, ``hf_baseline``
the transformers row, and ``engine_report`` turns them into the table, headline and chart.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetserve.bench.arguments import concurrency_list, non_negative_int, positive_int
from fleetserve.bench.engine_loop import run_engine_rows
from fleetserve.bench.engine_report import GOALS, apply_goals, format_table, headline, write_chart
from fleetserve.bench.hf_baseline import run_hf_subprocess
from fleetserve.bench.memory import MiB
from fleetserve.bench.results import created_now, host_environment, package_version, write_json
from fleetserve.bench.workload import DATA_DIR, DEFAULT_MODEL, RESULTS_DIR, load_prompts, take

DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
DEFAULT_OUTPUT = RESULTS_DIR / "engine.json"
SCENARIO = "chat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        default=[1, 4, 16, 64],
        help="comma-separated closed-loop concurrencies, one engine row each (default 1,4,16,64)",
    )
    parser.add_argument("--requests", type=positive_int, default=64, help="prompts each engine row runs (default 64)")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="output tokens per request (default 64)")
    parser.add_argument(
        "--hf-requests",
        type=non_negative_int,
        default=8,
        help="prompts the transformers baseline runs, one at a time (default 8; 0 skips it)",
    )
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON result file (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--prompts", type=Path, default=DEFAULT_PROMPTS, help=f"JSONL prompts file (default {DEFAULT_PROMPTS})"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="auto", help="the engine's --dtype (default auto)")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="eager decode steps (default: compiled, every batch size built before a row is timed)",
    )
    parser.add_argument(
        "--kv-cache-mb", type=float, default=None, help="KV cache size in MiB (default: the engine's default)"
    )
    parser.add_argument(
        "--max-num-seqs", type=positive_int, default=None, help="engine's most running sequences (default: engine's)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=None,
        help="engine's token budget per step (default: engine's)",
    )


def _environment() -> dict[str, Any]:
    import torch

    return host_environment(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        transformers=package_version("transformers"),
        cuda=torch.cuda.is_available(),
    )


def _run_baseline(args: argparse.Namespace, info: dict, prompt_ids: list[list[int]]) -> dict | None:
    """The transformers row (None when it is skipped), run in a subprocess on the engine's model, device and dtype."""
    if args.no_transformers or args.hf_requests <= 0:
        return None
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed (scripts/setup.sh --test installs it): no baseline row", flush=True)
        return None
    hf_prompts = take(prompt_ids, args.hf_requests)
    print(f"transformers: {len(hf_prompts)} requests x {args.max_tokens} tokens, one at a time ...", flush=True)
    payload = {
        "model_dir": info["model_dir"],
        "prompts": hf_prompts,
        "max_new_tokens": args.max_tokens,
        "threads": args.threads,
        "device": info["device"],
        "dtype": info["dtype"],
    }
    hf_row = {"name": "transformers", "kind": "transformers", "concurrency": 1}
    hf_row.update(run_hf_subprocess(payload))
    return hf_row


def _settings(args: argparse.Namespace, hf_row: dict | None) -> dict[str, Any]:
    """The options of the run, as the result records them."""
    return {
        "prompts": str(args.prompts),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "concurrency": list(args.concurrency),
        "hf_requests": 0 if hf_row is None else args.hf_requests,
        "threads": args.threads,
        "kv_cache_mb": args.kv_cache_mb,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }


def _print_report(args: argparse.Namespace, result: dict, output: Path, chart: Path | None) -> None:
    """The scenario line, the table, the headline and where the results went, on stdout."""
    info = result["engine"]
    print()
    print(
        f"{SCENARIO} scenario: {args.requests} requests x {args.max_tokens} tokens, model {info['model']} on "
        f"{info['device']}/{info['dtype']}, KV cache {info['kv_cache_bytes'] / MiB:.0f} MiB "
        f"({info['kv_blocks_total']} blocks of {info['block_size']} tokens)"
    )
    print(format_table(result["rows"]))
    print()
    for line in result["headline"]:
        print(line)
    print(f"results: {output}" + (f" and {chart}" if chart else ""), flush=True)


def run(args: argparse.Namespace) -> dict:
    """Run every engine row and the transformers baseline, print the table, write the JSON, return the result."""
    messages = load_prompts(args.prompts)
    engine_rows, info, prompt_ids = run_engine_rows(args, messages)
    hf_row = _run_baseline(args, info, prompt_ids)
    apply_goals(engine_rows, hf_row)
    rows = engine_rows + ([hf_row] if hf_row else [])
    output = Path(args.output)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "scenario": SCENARIO,
        "created": created_now(),
        "settings": _settings(args, hf_row),
        "environment": _environment(),
        "engine": info,
        "goals": {str(c): g for c, g in GOALS.items()},
        "rows": rows,
        "headline": headline(engine_rows, hf_row),
        "chart": None,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    chart = write_chart(rows, output.with_suffix(".png"), SCENARIO)
    result["chart"] = None if chart is None else str(chart)
    write_json(output, result)
    _print_report(args, result, output, chart)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse ``argv``, run; exit status 1 if any request failed."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/engine.py",
        description="fleetserve engine benchmark: the chat scenario at several concurrencies vs transformers.",
    )
    add_arguments(parser)
    result = run(parser.parse_args(argv))
    return 1 if any(row["failed"] for row in result["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
