"""The engine benchmark: the ``chat`` scenario run in-process through LLMEngine, against plain transformers.

Every prompt of ``benchmarks/data/prompts.jsonl`` is a chat; each asks for ``max_tokens`` tokens, greedy, ignoring
EOS, so every request produces exactly ``max_tokens`` tokens. The engine runs a closed loop at each concurrency c:
c requests are kept in the engine, and when one finishes the next prompt is added, until all are done. Each
concurrency gets a freshly built engine (so no scenario reuses the prefix cache another one filled), warmed up with
one short request before the clock starts. The transformers baseline runs ``generate`` one request at a time in a
subprocess of this script, so its peak RSS is its own; it hands its figures back as JSON on stdout.

Run it as ``python benchmarks/engine.py`` (see ``--help``); ``run`` returns the same dict it writes as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from itertools import pairwise
from pathlib import Path
from typing import Any

from fleetserve.errors import FleetServeError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PROMPTS = REPO_ROOT / "benchmarks" / "data" / "prompts.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "engine.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
SCENARIO = "chat"
MiB = 1024 * 1024

GOALS: dict[int, float] = {1: 2.0, 16: 14.0, 64: 25.0}
"""Engine tokens/s over transformers tokens/s wanted at these concurrencies (the headline of the benchmark)."""

# A step that schedules nothing while requests are unfinished should not happen; this many in a row ends the run.
_MAX_IDLE_STEPS = 1000


# -- statistics -------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) of ``values`` by linear interpolation between closest ranks.

    This is numpy's default ("linear") method: sort, place q on the scale 0..n-1, and interpolate between the two
    neighbouring values. One value is every percentile of itself; no values give None.
    """
    if not 0 <= q <= 100 or math.isnan(q):
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in qs}


# -- memory -----------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size: VmHWM from /proc, else getrusage (None if neither works).

    VmHWM belongs to the process's current address space, so a subprocess does not inherit its parent's figure
    (getrusage's ru_maxrss can, across fork and exec).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to /proc/self/clear_refs); True if that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


# -- traces and rows --------------------------------------------------------------------------------------


@dataclass
class RequestTrace:
    """What one request did, in time.monotonic() seconds."""

    request_id: str
    prompt_tokens: int
    arrival: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    """Time of each output that carried tokens."""
    output_tokens: int = 0
    finish_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.finish_reason in ("stop", "length")


def summarize(traces: Sequence[RequestTrace], wall_s: float) -> dict[str, Any]:
    """Counts, throughput and latency percentiles of a finished run (seconds; tokens/s over the wall time)."""
    completed = [t for t in traces if t.completed]
    output_tokens = sum(t.output_tokens for t in traces)
    ttft = [t.first_token - t.arrival for t in traces if t.first_token is not None and t.arrival is not None]
    itl = [b - a for t in traces for a, b in pairwise(t.token_times)]
    e2e = [t.finish_time - t.arrival for t in completed if t.finish_time is not None and t.arrival is not None]
    errors = sorted({t.error or f"finish_reason={t.finish_reason}" for t in traces if not t.completed})
    return {
        "requests": len(traces),
        "completed": len(completed),
        "failed": len(traces) - len(completed),
        "errors": errors[:5],
        "prompt_tokens": sum(t.prompt_tokens for t in traces),
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_s": _percentiles(ttft, (50, 90, 99)),
        "itl_s": _percentiles(itl, (50, 99)),
        "e2e_s": _percentiles(e2e, (50, 99)),
    }


# -- inputs -----------------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[list[dict]]:
    """The ``messages`` of every line of a JSONL prompts file, in file order."""
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"{path}:{number}: expected an object with a 'messages' list")
            prompts.append(record["messages"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _take(items: Sequence[Any], n: int) -> list[Any]:
    """The first n items, cycling through ``items`` again when n is larger."""
    return [items[i % len(items)] for i in range(n)]


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=[1, 4, 16, 64],
        help="comma-separated closed-loop concurrencies, one engine row each (default 1,4,16,64)",
    )
    parser.add_argument("--requests", type=_positive_int, default=64, help="prompts each engine row runs (default 64)")
    parser.add_argument("--max-tokens", type=_positive_int, default=64, help="output tokens per request (default 64)")
    parser.add_argument(
        "--hf-requests",
        type=_non_negative_int,
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
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--kv-cache-mb", type=float, default=None, help="KV cache size in MiB (default: the engine's default)"
    )
    parser.add_argument(
        "--max-num-seqs", type=_positive_int, default=None, help="engine's most running sequences (default: engine's)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=None,
        help="engine's token budget per step (default: engine's)",
    )


# -- the engine -------------------------------------------------------------------------------------------


def _engine_config(args: argparse.Namespace):
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    cache = CacheConfig()
    if args.kv_cache_mb is not None:
        cache.kv_cache_bytes = int(args.kv_cache_mb * MiB)
    scheduler = SchedulerConfig()
    if args.max_num_seqs is not None:
        scheduler.max_num_seqs = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        scheduler.max_num_batched_tokens = args.max_num_batched_tokens
    return EngineConfig(model=ModelConfig(model=args.model, num_threads=args.threads), cache=cache, scheduler=scheduler)


def _warm_up(engine, warm_ids: list[int]) -> None:
    """One short request through every stage (prefill, decode, sampling) before timing."""
    from fleetserve.contract import SamplingParams

    engine.generate([warm_ids], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))


def kv_bytes_per_token(engine) -> int:
    """Theoretical KV bytes of one token: 2 (key, value) x layers x kv heads x head dim x element size."""
    import torch

    elem = torch.empty((), dtype=engine.runner.dtype).element_size()
    return 2 * engine.arch.num_layers * engine.arch.num_kv_heads * engine.arch.head_dim * elem


def run_engine_closed_loop(engine, prompts: Sequence[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Run ``prompts`` through ``engine`` keeping ``concurrency`` in flight; return the row's figures."""
    from fleetserve.contract import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queue = deque(enumerate(prompts))
    live: dict[str, RequestTrace] = {}
    traces: list[RequestTrace] = []
    before = engine.stats()
    live_tokens = peak_live_tokens = 0
    peak_blocks = before.kv_blocks_used
    idle_steps = 0
    steps = before.steps
    rss_reset = reset_peak_rss()
    start = time.monotonic()
    while queue or live:
        while queue and len(live) < concurrency:
            index, ids = queue.popleft()
            trace = RequestTrace(f"c{concurrency}-{index}", len(ids))
            traces.append(trace)
            try:
                engine.add_request(ids, params, request_id=trace.request_id)
            except FleetServeError as exc:
                trace.error, trace.finish_reason = f"{type(exc).__name__}: {exc}", "error"
                continue
            live[trace.request_id] = trace
            live_tokens += len(ids)
        if not live:
            continue
        outputs = engine.step()
        stats = engine.stats()
        finished = []
        for out in outputs:
            trace = live.get(out.request_id)
            if trace is None:
                continue
            trace.arrival = out.arrival_time
            if out.new_token_ids:
                trace.token_times.append(out.time)
                live_tokens += len(out.new_token_ids)
            trace.first_token = out.first_token_time
            trace.output_tokens = out.num_output_tokens
            if out.finished:
                trace.finish_reason, trace.finish_time = out.finish_reason, out.time
                finished.append(trace)
        # Sampled after the step: the blocks and tokens of requests finishing in it count, as they were in use.
        peak_live_tokens = max(peak_live_tokens, live_tokens)
        peak_blocks = max(peak_blocks, stats.kv_blocks_used)
        for trace in finished:
            live_tokens -= trace.prompt_tokens + trace.output_tokens
            del live[trace.request_id]
        idle_steps = idle_steps + 1 if not outputs and stats.steps == steps else 0
        steps = stats.steps
        if idle_steps >= _MAX_IDLE_STEPS:
            for trace in live.values():
                engine.abort(trace.request_id)
                trace.error, trace.finish_reason = "the engine stopped scheduling", "error"
            live.clear()
    wall_s = time.monotonic() - start
    after = engine.stats()
    row = summarize(traces, wall_s)
    per_token = kv_bytes_per_token(engine)
    block_size = engine.config.cache.block_size
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    row.update(
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_scope="run" if rss_reset else "process",
        engine_steps=after.steps - before.steps,
        preemptions=after.num_preemptions - before.num_preemptions,
        prefix_cache_hit_rate=(after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0,
        kv={
            "allocated_bytes": engine.runner.kv_cache_bytes,
            "block_size": block_size,
            "blocks_total": after.kv_blocks_total,
            "peak_blocks_used": peak_blocks,
            "peak_blocks_bytes": peak_blocks * (engine.runner.kv_cache_bytes // after.kv_blocks_total),
            "peak_live_tokens": peak_live_tokens,
            "bytes_per_token": per_token,
            "theoretical_bytes": per_token * peak_live_tokens,
        },
    )
    return row


def run_engine_rows(
    args: argparse.Namespace, prompt_messages: list[list[dict]], log=print
) -> tuple[list[dict], dict, list[list[int]]]:
    """Build a fresh engine per concurrency and run the closed loop; return (rows, engine info, prompt ids)."""
    from fleetserve.engine.engine import LLMEngine
    from fleetserve.text.tokenizer import Tokenizer

    rows: list[dict] = []
    info: dict[str, Any] = {}
    prompt_ids: list[list[int]] = []
    for concurrency in args.concurrency:
        started = time.monotonic()
        engine = LLMEngine(_engine_config(args), progress=False)
        build_s = time.monotonic() - started
        if not info:
            tokenizer = Tokenizer.from_dir(engine.model_dir)
            prompt_ids = [tokenizer.encode_chat(messages) for messages in prompt_messages]
            # Plain text, not a chat: it must not leave the chat template's prefix in the prefix cache.
            warm_ids = tokenizer.encode("Hello! How are you today?")
            stats = engine.stats()
            info = {
                "model": args.model,
                "model_dir": str(engine.model_dir),
                "device": str(engine.runner.device),
                "dtype": str(engine.runner.dtype).removeprefix("torch."),
                "num_layers": engine.arch.num_layers,
                "num_kv_heads": engine.arch.num_kv_heads,
                "head_dim": engine.arch.head_dim,
                "block_size": engine.config.cache.block_size,
                "kv_cache_bytes": engine.runner.kv_cache_bytes,
                "kv_blocks_total": stats.kv_blocks_total,
                "max_num_seqs": engine.config.scheduler.max_num_seqs,
                "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
                "build_s": build_s,
            }
        _warm_up(engine, warm_ids)
        requests = _take(prompt_ids, args.requests)
        log(f"engine c={concurrency}: {len(requests)} requests x {args.max_tokens} tokens ...")
        row = {"name": f"engine c={concurrency}", "kind": "engine", "concurrency": concurrency}
        row.update(run_engine_closed_loop(engine, requests, concurrency, args.max_tokens))
        log(f"  {row['output_tokens_per_s']:.1f} tok/s, {row['completed']}/{row['requests']} completed")
        rows.append(row)
        del engine
        gc.collect()
    return rows, info, prompt_ids


# -- the transformers baseline ----------------------------------------------------------------------------


def hf_baseline(
    model_dir: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """transformers ``generate``, greedy, exactly ``max_new_tokens`` tokens, one prompt at a time (in this process)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    if threads:
        torch.set_num_threads(threads)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    load_s = time.monotonic() - started
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos

    class TokenClock(BaseStreamer):
        """Records when generate hands out each new token (its first put is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.times.append(time.monotonic())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    def generate(ids: list[int], n: int, streamer: BaseStreamer | None = None) -> int:
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
        return int(out.shape[1] - input_ids.shape[1])

    generate(prompts[0], 2)  # warm-up
    load_peak = peak_rss_bytes()
    rss_reset = reset_peak_rss()
    traces = []
    start = time.monotonic()
    for index, ids in enumerate(prompts):
        clock = TokenClock()
        trace = RequestTrace(f"hf-{index}", len(ids), arrival=time.monotonic())
        trace.output_tokens = generate(ids, max_new_tokens, clock)
        trace.finish_time = time.monotonic()
        trace.token_times = clock.times
        trace.first_token = clock.times[0] if clock.times else None
        trace.finish_reason = "length"
        traces.append(trace)
    row = summarize(traces, time.monotonic() - start)
    row.update(
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_scope="run" if rss_reset else "process",
        load_peak_rss_bytes=load_peak,
        load_s=load_s,
        device=device,
        dtype=dtype,
        torch_threads=torch.get_num_threads(),
    )
    return row


def _hf_worker_main() -> int:
    """Subprocess entry: hf_baseline's keyword arguments as JSON on stdin, its result as JSON on stdout."""
    payload = json.load(sys.stdin)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print must not mix with the result
    try:
        result = hf_baseline(**payload)
    finally:
        sys.stdout = stdout
    stdout.write(json.dumps(result) + "\n")
    stdout.flush()
    return 0


def run_hf_subprocess(payload: dict[str, Any]) -> dict[str, Any]:
    """Run hf_baseline in a fresh interpreter; on failure return a row of failed requests with the error."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    code = "from fleetserve.bench.engine_bench import _hf_worker_main; raise SystemExit(_hf_worker_main())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    error = None
    if proc.returncode != 0 or not lines:
        error = f"transformers subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    else:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError as exc:
            error = f"transformers subprocess printed no JSON result ({exc}): {lines[-1][:200]!r}"
    if error is not None:
        row = summarize(
            [RequestTrace(f"hf-{i}", len(ids), error=error) for i, ids in enumerate(payload["prompts"])], 0.0
        )
        row.update(peak_rss_bytes=None, peak_rss_scope=None, error=error)
        return row
    return result


# -- reporting --------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows (TTFT and ITL in ms, end-to-end in s, memory in MiB)."""
    header = (
        "scenario",
        "done",
        "fail",
        "out tok",
        "wall s",
        "tok/s",
        "x HF",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p99 ms",
        "E2E p50/p99 s",
        "RSS MiB",
        "KV blk peak/total",
        "KV theo MiB",
    )
    table = [header]
    for row in rows:
        ttft, itl, e2e, kv = row["ttft_s"], row["itl_s"], row["e2e_s"], row.get("kv")
        ratio = row.get("ratio_vs_transformers")
        table.append(
            (
                row["name"],
                str(row["completed"]),
                str(row["failed"]),
                str(row["output_tokens"]),
                f"{row['wall_s']:.2f}",
                f"{row['output_tokens_per_s']:.1f}",
                "-" if ratio is None else f"{ratio:.1f}x",
                "/".join(_ms(ttft[p]) for p in ("p50", "p90", "p99")),
                "/".join(_ms(itl[p]) for p in ("p50", "p99")),
                "/".join(_s(e2e[p]) for p in ("p50", "p99")),
                _mib(row.get("peak_rss_bytes")),
                f"{kv['peak_blocks_used']}/{kv['blocks_total']}" if kv else "-",
                f"{kv['theoretical_bytes'] / MiB:.1f}" if kv else "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for n, line in enumerate(table):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline(engine_rows: Sequence[dict], hf_row: dict | None) -> list[str]:
    """One line per engine row: its tokens/s and its ratio to transformers, with the goal where there is one."""
    lines = []
    for row in engine_rows:
        line = f"c={row['concurrency']}: {row['output_tokens_per_s']:.1f} tok/s"
        ratio = row.get("ratio_vs_transformers")
        if ratio is None:
            line += " (no transformers baseline)"
        else:
            line += f" = {ratio:.1f}x transformers"
            goal = row.get("goal_ratio")
            if goal is not None:
                line += f" (goal >= {goal:g}x: {'met' if row['meets_goal'] else 'NOT met'})"
        lines.append(line)
    if hf_row is not None and hf_row.get("error"):
        lines.append(f"transformers: failed: {hf_row['error'].splitlines()[0][:200]}")
    elif hf_row is not None:
        lines.append(
            f"transformers: {hf_row['output_tokens_per_s']:.1f} tok/s ({hf_row['completed']} requests one at a time)"
        )
    return lines


def write_chart(rows: Sequence[dict], path: Path) -> Path | None:
    """A bar chart of tokens/s per row, if matplotlib is importable; None otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [row["name"] for row in rows]
    values = [row["output_tokens_per_s"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 4))
    bars = ax.bar(names, values, color=["#888888" if row["kind"] != "engine" else "#3366cc" for row in rows])
    for bar, row in zip(bars, rows, strict=True):
        ratio = row.get("ratio_vs_transformers")
        if ratio is not None:
            ax.annotate(
                f"{ratio:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"fleetserve engine, {SCENARIO} scenario")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _environment() -> dict[str, Any]:
    import torch

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers_version,
        "cuda": torch.cuda.is_available(),
    }


# -- entry points -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Run every engine row and the transformers baseline, print the table, write the JSON, return the result."""
    messages = load_prompts(args.prompts)
    engine_rows, info, prompt_ids = run_engine_rows(args, messages)
    hf_row = None
    if not args.no_transformers and args.hf_requests > 0:
        hf_prompts = _take(prompt_ids, args.hf_requests)
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
    baseline = hf_row["output_tokens_per_s"] if hf_row and hf_row["completed"] else None
    for row in engine_rows:
        row["ratio_vs_transformers"] = row["output_tokens_per_s"] / baseline if baseline else None
        row["goal_ratio"] = GOALS.get(row["concurrency"])
        row["meets_goal"] = (
            None
            if row["goal_ratio"] is None or row["ratio_vs_transformers"] is None
            else row["ratio_vs_transformers"] >= row["goal_ratio"]
        )
    rows = engine_rows + ([hf_row] if hf_row else [])
    lines = headline(engine_rows, hf_row)
    output = Path(args.output)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "scenario": SCENARIO,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
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
        },
        "environment": _environment(),
        "engine": info,
        "goals": {str(c): g for c, g in GOALS.items()},
        "rows": rows,
        "headline": lines,
        "chart": None,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    chart = write_chart(rows, output.with_suffix(".png"))
    result["chart"] = None if chart is None else str(chart)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print()
    print(
        f"{SCENARIO} scenario: {args.requests} requests x {args.max_tokens} tokens, model {info['model']} on "
        f"{info['device']}/{info['dtype']}, KV cache {info['kv_cache_bytes'] / MiB:.0f} MiB "
        f"({info['kv_blocks_total']} blocks of {info['block_size']} tokens)"
    )
    print(format_table(rows))
    print()
    for line in lines:
        print(line)
    print(f"results: {output}" + (f" and {chart}" if chart else ""), flush=True)
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
