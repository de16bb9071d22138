"""Weight formats end to end: ``fleetserve bench`` against ``fleetserve up --workers 1`` for each ``--dtype``.

For each format: ``up`` with one worker (no prefix cache, so every level prefills its prompts afresh), the chat
scenario (greedy, ``ignore_eos``, ``--max-tokens`` tokens) at each ``--concurrency`` with ``max(--requests, c)``
requests per level; then the same engine in this process (no gateway, no gRPC, no SSE) at ``--engine-concurrency``,
so what is lost between the engine and the client shows as the ratio of the two at the same concurrency; the
worker's peak RSS; and per ``up`` row the CPU that its gateway, its worker's serving threads, its engine and the
load generator spent a request (``cpu_per_request``). In the same run: transformers' sequential ``generate``
(float32, ``--hf-requests`` prompts), and, when ``--llama-server`` names a binary, llama.cpp's server on the same
GGUF file with ``--slots`` slots and no prompt cache, measured with the same load generator.

    python benchmarks/formats.py [--formats float32,bfloat16,int4] [--concurrency 1,16,64] [--llama-server PATH]

Writes ``benchmarks/results/formats.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from fleetserve.bench.arguments import concurrency_list, non_negative_int, positive_int
from fleetserve.bench.fleet_cpu import FleetCpu, describe, fleet_processes
from fleetserve.bench.local_fleet import READY_S, free_port, wait_compiled
from fleetserve.bench.memory import peak_rss_bytes
from fleetserve.bench.results import cpu_description, created_now, host_environment, package_version, write_json
from fleetserve.bench.workload import DATA_DIR, DEFAULT_MODEL, RESULTS_DIR, WARM_UP_TEXT, load_prompts, take
from fleetserve.supervisor import ChildSpec, Supervisor
from fleetserve.up import threads_per_worker

DEFAULT_OUTPUT = RESULTS_DIR / "formats.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--formats", default="float32,bfloat16,int4", help="--dtype values, in turn")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 16, 64], help="levels (default 1,16,64)")
    parser.add_argument(
        "--engine-concurrency", type=concurrency_list, default=[1, 16], help="engine-alone levels (default 1,16)"
    )
    parser.add_argument("--requests", type=positive_int, default=32, help="requests per level, at least c (32)")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="times to take each format's up and engine-alone levels, in turn (1); ratios are per round, and medians",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="output tokens per request (64)")
    parser.add_argument("--hf-requests", type=non_negative_int, default=8, help="transformers prompts (8; 0 skips)")
    parser.add_argument("--threads", type=positive_int, default=None, help="worker threads (default: up's)")
    parser.add_argument(
        "--stream-intervals",
        type=stream_interval_list,
        default=[None],
        help="up's --stream-interval values, each a fleet of its own measured in turn with the others; 'default' "
        "leaves it to the worker (4 on CPU, 1 on CUDA). Default: default",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="eager decode steps (default: compiled, built before measuring)"
    )
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary, if any")
    parser.add_argument("--slots", type=positive_int, default=16, help="llama-server's parallel slots (16)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON result (default {DEFAULT_OUTPUT})")


def _worker_peak_rss(up_pid: int) -> int | None:
    """Peak RSS (VmHWM) of the worker process under ``up``'s process, if it can be read."""
    pid = fleet_processes(up_pid).get("worker")
    return None if pid is None else peak_rss_bytes(pid)


def _http_levels(
    url: str, args: argparse.Namespace, label: str, model: str, turn: int | None = None, cpu: FleetCpu | None = None
) -> list[dict[str, Any]]:
    """``fleetserve bench``'s chat rows against ``url``, one per concurrency; with ``cpu`` (an `up` fleet's), each
    row also gets the CPU its processes and the load generator spent a request."""
    from fleetserve.bench.http_bench import run
    from fleetserve.bench.http_options import build_parser

    rows = []
    for c in args.concurrency:
        out = Path(f"/tmp/fleetserve-formats-{label}-c{c}.json")
        bench_args = build_parser().parse_args(
            ["--url", url, "--model", model, "--scenario", "chat", "--max-tokens", str(args.max_tokens)]
            + ["--requests", str(max(args.requests, c)), "--concurrency", str(c), "--output", str(out)]
        )
        before = cpu.snapshot() if cpu is not None else {}
        row = run(bench_args)["rows"][0]
        if cpu is not None:
            row["cpu_per_request"] = cpu.per_request(before, cpu.snapshot(), row.get("requests", 0))
            if row["cpu_per_request"]:
                print(f"{_row_name(label, c, turn, args)}: {describe(row['cpu_per_request'])}", flush=True)
        row.update(name=_row_name(label, c, turn, args), kind=label, concurrency=c)
        if turn is not None:
            row["round"] = turn
        rows.append(row)
    return rows


def _row_name(label: str, c: int, turn: int | None, args: argparse.Namespace) -> str:
    """A row's name; with several rounds, its round's number."""
    return f"{label} c={c}" + (f" #{turn + 1}" if turn is not None and args.rounds > 1 else "")


def stream_interval_list(text: str) -> list[int | None]:
    """Comma-separated ``--stream-interval`` values: integers >= 1, or ``default`` (None: the worker's own)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part == "default" or (part.isdigit() and int(part) >= 1) for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 or 'default', got {text!r}")
    return [None if part == "default" else int(part) for part in parts]


def _up_label(fmt: str, interval: int | None) -> str:
    """The name of ``up``'s rows in ``fmt`` with ``--stream-interval interval`` (None: the worker's default)."""
    return f"up {fmt}" + ("" if interval is None else f" interval {interval}")


def _format_of(kind: str) -> str:
    """The format of an ``up`` row's kind (``"up int4 interval 4"``: ``"int4"``)."""
    return kind.removeprefix("up ").split(" interval ")[0]


@contextmanager
def _up_fleet(
    fmt: str, interval: int | None, args: argparse.Namespace
) -> Iterator[tuple[str, dict[str, Any], FleetCpu]]:
    """``up`` with one worker in ``fmt`` (``--stream-interval interval``, or the worker's default for None), ready
    and its decode steps compiled; yields its URL, what is known of it (to which the worker's peak RSS is added
    when the caller is done with it) and the meter of its processes' CPU."""
    port, control = free_port(), free_port()
    up = ["up", "--workers", "1", "--dtype", fmt, "--no-prefix-caching", "--port", str(port)]
    up += ["--control-port", str(control)] + (["--threads", str(args.threads)] if args.threads else [])
    up += [] if interval is None else ["--stream-interval", str(interval)]
    up += ["--no-compile"] if args.no_compile else []
    supervisor = Supervisor()
    try:
        child = supervisor.start(
            ChildSpec(f"up-{fmt}", [sys.executable, "-m", "fleetserve", *up], ready="fleetserve is ready")
        )
        child.wait_ready(READY_S)
        url = f"http://127.0.0.1:{port}"
        info: dict[str, Any] = {"compile_wait_s": wait_compiled(url)}
        yield url, info, FleetCpu(child.pid, threads_per_worker(args.threads, 1))
        info.update(worker_peak_rss_bytes=_worker_peak_rss(child.pid), ready=httpx.get(url + "/ready").json())
    finally:
        supervisor.stop_all()


def _warm_engine(fmt: str, args: argparse.Namespace, prompts: list[list[dict]]) -> tuple[Any, list[list[int]]]:
    """The engine alone in ``fmt``, in this process, warmed up and compiled; and the prompts' token ids."""
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.engine import LLMEngine
    from fleetserve.text.tokenizer import Tokenizer

    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=fmt, num_threads=args.threads, compile=not args.no_compile),
        cache=CacheConfig(enable_prefix_caching=False),
    )
    engine = LLMEngine(config, progress=False)
    tokenizer = Tokenizer.from_dir(engine.model_dir)
    ids = [tokenizer.encode_chat(m) for m in prompts]
    engine.generate([tokenizer.encode(WARM_UP_TEXT)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.wait_compiled()
    return engine, ids


def _engine_levels(engine, ids: list[list[int]], fmt: str, args: argparse.Namespace, turn: int) -> list[dict]:
    from fleetserve.bench.engine_loop import run_engine_closed_loop

    rows = []
    for c in args.engine_concurrency:
        row: dict[str, Any] = {"name": _row_name(f"engine {fmt}", c, turn, args), "kind": f"engine {fmt}"}
        row.update(concurrency=c, round=turn)
        row.update(run_engine_closed_loop(engine, take(ids, max(args.requests, c)), c, args.max_tokens))
        print(f"{row['name']}: {row['output_tokens_per_s']:.1f} tok/s", flush=True)
        rows.append(row)
    return rows


def _format_rows(fmt: str, args: argparse.Namespace, prompts: list[list[dict]]) -> tuple[list[dict], dict[str, Any]]:
    """One format: ``up`` (a fleet per stream interval) and the engine alone side by side (each idle while
    another is measured), their levels taken in turn ``--rounds`` times, so that all see the machine alike."""
    rows: list[dict[str, Any]] = []
    with ExitStack() as fleets:
        ups = {_up_label(fmt, n): fleets.enter_context(_up_fleet(fmt, n, args)) for n in args.stream_intervals}
        engine, ids = _warm_engine(fmt, args, prompts)
        for turn in range(args.rounds):
            for label, (url, _, cpu) in ups.items():
                rows += _http_levels(url, args, label, args.model, turn, cpu)
            rows += _engine_levels(engine, ids, fmt, args, turn)
        del engine
        gc.collect()
    return rows, {label.removeprefix("up "): info for label, (_, info, _) in ups.items()}


def _llama_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from fleetserve.model_files.catalog import resolve_source

    port = free_port()
    command = [str(args.llama_server), "-m", str(resolve_source(args.model)), "--port", str(port)]
    command += ["-np", str(args.slots), "-c", str(2048 * args.slots), "--no-cache-prompt", "--no-webui"]
    if args.threads:
        command += ["-t", str(args.threads)]
    supervisor = Supervisor()
    try:
        supervisor.start(ChildSpec("llama-server", command))
        deadline = time.monotonic() + READY_S
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return _http_levels(url, args, "llama-server", args.model), {"command": command[1:]}
    finally:
        supervisor.stop_all()


def _hf_row(args: argparse.Namespace, prompts: list[list[dict]]) -> dict[str, Any] | None:
    if args.hf_requests <= 0:
        return None
    from fleetserve.bench.hf_baseline import run_hf_subprocess
    from fleetserve.model_files.catalog import prepare_model_dir
    from fleetserve.text.tokenizer import Tokenizer

    model_dir = prepare_model_dir(args.model, progress=False)
    tokenizer = Tokenizer.from_dir(model_dir)
    payload = {
        "model_dir": str(model_dir),
        "prompts": [tokenizer.encode_chat(m) for m in take(prompts, args.hf_requests)],
        "max_new_tokens": args.max_tokens,
        "threads": args.threads,
        "device": "cpu",
        "dtype": "float32",
    }
    print(f"transformers: {args.hf_requests} requests x {args.max_tokens} tokens, one at a time ...", flush=True)
    row = {"name": "transformers c=1", "kind": "transformers", "concurrency": 1}
    row.update(run_hf_subprocess(payload))
    return row


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput ratios at equal concurrency: each up row against llama-server and transformers (the medians of
    its rounds), and against its engine alone (the median of the rounds' ratios, each within one round)."""
    tps: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.get("output_tokens_per_s"):
            tps.setdefault((r["kind"], r["concurrency"]), []).append(r["output_tokens_per_s"])
    hf = tps.get(("transformers", 1))
    by_round = end_to_end_by_round(rows)
    out: dict[str, float] = {}
    for (kind, c), values in tps.items():
        if not kind.startswith("up "):
            continue
        fmt, up = kind.removeprefix("up "), statistics.median(values)  # with its stream interval, if not 1
        if ("llama-server", c) in tps:
            out[f"{fmt} c={c} / llama-server"] = up / statistics.median(tps[("llama-server", c)])
        if hf:
            out[f"{fmt} c={c} / transformers sequential"] = up / hf[0]
        if by_round.get(f"{fmt} c={c}"):
            out[f"{fmt} c={c} end to end / engine alone"] = statistics.median(by_round[f"{fmt} c={c}"])
    return out


def end_to_end_by_round(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per format and concurrency (``"int4 c=16"``), ``up`` against the engine alone, one ratio per round."""
    one_round = {
        (r["kind"], r["concurrency"], r.get("round") or 0): r["output_tokens_per_s"]
        for r in rows
        if r.get("output_tokens_per_s")
    }
    out: dict[str, list[float]] = {}
    for (kind, c, turn), up in sorted(one_round.items()):
        engine = one_round.get((f"engine {_format_of(kind)}", c, turn))
        if kind.startswith("up ") and engine:
            out.setdefault(f"{kind.removeprefix('up ')} c={c}", []).append(up / engine)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    prompts = load_prompts(DATA_DIR / "prompts.jsonl")
    rows: list[dict[str, Any]] = []
    workers: dict[str, Any] = {}
    for fmt in args.formats.split(","):
        format_rows, fleets = _format_rows(fmt, args, prompts)
        rows += format_rows
        workers.update(fleets)
    llama = None
    if args.llama_server:
        llama_rows, llama = _llama_rows(args)
        rows += llama_rows
    hf = _hf_row(args, prompts)
    if hf:
        rows.append(hf)
    result = {
        "benchmark": "formats",
        "created": created_now(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": host_environment(
            cpu=cpu_description(), torch=torch.__version__, transformers=package_version("transformers")
        ),
        "workers": workers,
        "llama_server": llama,
        "rows": rows,
        "ratios": ratios(rows),
        "end_to_end_by_round": end_to_end_by_round(rows),
    }
    write_json(Path(args.output), result)
    print()
    print(f"{'row':<28} {'tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8}")
    for r in rows:
        ttft, itl = r.get("ttft_s") or {}, r.get("itl_s") or {}
        print(
            f"{r['name']:<28} {r.get('output_tokens_per_s', 0):>8.1f} {ttft.get('p50', float('nan')):>9.3f} "
            f"{itl.get('p50', float('nan')):>8.4f}"
        )
    for fmt, info in workers.items():
        rss = info.get("worker_peak_rss_bytes")
        print(f"worker peak RSS, {fmt}: {rss / 2**20:.0f} MiB" if rss else f"worker peak RSS, {fmt}: unknown")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x")
    if args.rounds > 1:
        for name, values in result["end_to_end_by_round"].items():
            print(f"{name} end to end / engine alone, by round: " + ", ".join(f"{v:.2f}x" for v in values))
    print(f"results: {args.output}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/formats.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
