"""The engine side of the engine benchmark: a closed loop of requests through a fresh LLMEngine per concurrency."""

from __future__ import annotations

import argparse
import gc
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from fleetserve.bench.memory import MiB, peak_rss_bytes, reset_peak_rss
from fleetserve.bench.traces import RequestTrace, summarize
from fleetserve.bench.workload import WARM_UP_TEXT, take
from fleetserve.errors import FleetServeError

# A step that schedules nothing while requests are unfinished should not happen; this many in a row ends the run.
_MAX_IDLE_STEPS = 1000


def _engine_config(args: argparse.Namespace, concurrency: int):
    """The engine of one row. A compiling engine holds at most ``concurrency`` sequences unless told otherwise:
    no more ever run, and it need not compile batch sizes the row never reaches."""
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    cache = CacheConfig()
    if args.kv_cache_mb is not None:
        cache.kv_cache_bytes = int(args.kv_cache_mb * MiB)
    scheduler = SchedulerConfig()
    compile = not getattr(args, "no_compile", False)
    if args.max_num_seqs is not None:
        scheduler.max_num_seqs = args.max_num_seqs
    elif compile:
        scheduler.max_num_seqs = min(scheduler.max_num_seqs, concurrency)
    if args.max_num_batched_tokens is not None:
        scheduler.max_num_batched_tokens = args.max_num_batched_tokens
    model = ModelConfig(
        model=args.model, dtype=getattr(args, "dtype", "auto"), num_threads=args.threads, compile=compile
    )
    return EngineConfig(model=model, cache=cache, scheduler=scheduler)


def _warm_up(engine, warm_ids: list[int]) -> float:
    """One short request through every stage (prefill, decode, sampling) before timing, and every compiled
    decode step built; returns the seconds spent waiting for those."""
    from fleetserve.contract import SamplingParams

    engine.generate([warm_ids], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    started = time.monotonic()
    engine.wait_compiled()
    return time.monotonic() - started


def kv_bytes_per_token(engine) -> int:
    """Theoretical KV bytes of one token: 2 (key, value) x layers x kv heads x head dim x element size."""
    import torch

    elem = torch.empty((), dtype=engine.runner.kv_dtype).element_size()
    return 2 * engine.arch.num_layers * engine.arch.num_kv_heads * engine.arch.head_dim * elem


class _ClosedLoop:
    """One closed-loop run: the prompts still to send, the requests in the engine, and the KV peaks seen so far."""

    def __init__(self, engine, prompts: Sequence[list[int]], concurrency: int, max_tokens: int) -> None:
        from fleetserve.contract import SamplingParams

        self.engine = engine
        self.concurrency = concurrency
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.queue = deque(enumerate(prompts))
        self.live: dict[str, RequestTrace] = {}
        self.traces: list[RequestTrace] = []
        self.before = engine.stats()
        self.live_tokens = self.peak_live_tokens = 0
        self.peak_blocks = self.before.kv_blocks_used
        self.idle_steps = 0
        self.steps = self.before.steps

    def admit(self) -> None:
        """Add queued prompts to the engine until ``concurrency`` are in it (a refused one fails at once)."""
        while self.queue and len(self.live) < self.concurrency:
            index, ids = self.queue.popleft()
            trace = RequestTrace(f"c{self.concurrency}-{index}", len(ids))
            self.traces.append(trace)
            try:
                self.engine.add_request(ids, self.params, request_id=trace.request_id)
            except FleetServeError as exc:
                trace.error, trace.finish_reason = f"{type(exc).__name__}: {exc}", "error"
                continue
            self.live[trace.request_id] = trace
            self.live_tokens += len(ids)

    def step(self) -> None:
        """One engine step: record its outputs, update the peaks, retire finished requests, watch for a stall."""
        outputs = self.engine.step()
        stats = self.engine.stats()
        finished = self._record(outputs)
        # Sampled after the step: the blocks and tokens of requests finishing in it count, as they were in use.
        self.peak_live_tokens = max(self.peak_live_tokens, self.live_tokens)
        self.peak_blocks = max(self.peak_blocks, stats.kv_blocks_used)
        for trace in finished:
            self.live_tokens -= trace.prompt_tokens + trace.output_tokens
            del self.live[trace.request_id]
        self.idle_steps = self.idle_steps + 1 if not outputs and stats.steps == self.steps else 0
        self.steps = stats.steps
        if self.idle_steps >= _MAX_IDLE_STEPS:
            self._abort_live()

    def _record(self, outputs) -> list[RequestTrace]:
        """Copy the step's outputs into the live traces; return the traces that finished."""
        finished = []
        for out in outputs:
            trace = self.live.get(out.request_id)
            if trace is None:
                continue
            trace.arrival = out.arrival_time
            if out.new_token_ids:
                trace.token_times.append(out.time)
                self.live_tokens += len(out.new_token_ids)
            trace.first_token = out.first_token_time
            trace.output_tokens = out.num_output_tokens
            if out.finished:
                trace.finish_reason, trace.finish_time = out.finish_reason, out.time
                finished.append(trace)
        return finished

    def _abort_live(self) -> None:
        """Abort every request in the engine and mark it failed: the engine stopped scheduling."""
        for trace in self.live.values():
            self.engine.abort(trace.request_id)
            trace.error, trace.finish_reason = "the engine stopped scheduling", "error"
        self.live.clear()

    def engine_figures(self, after) -> dict[str, Any]:
        """The engine's counters over the run (``after``: its stats at the end) and the KV cache figures."""
        engine, before = self.engine, self.before
        per_token = kv_bytes_per_token(engine)
        queries = after.prefix_cache_queries - before.prefix_cache_queries
        return {
            "engine_steps": after.steps - before.steps,
            "preemptions": after.num_preemptions - before.num_preemptions,
            "prefix_cache_hit_rate": (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0,
            "kv": {
                "allocated_bytes": engine.runner.kv_cache_bytes,
                "block_size": engine.config.cache.block_size,
                "blocks_total": after.kv_blocks_total,
                "peak_blocks_used": self.peak_blocks,
                "peak_blocks_bytes": self.peak_blocks * (engine.runner.kv_cache_bytes // after.kv_blocks_total),
                "peak_live_tokens": self.peak_live_tokens,
                "bytes_per_token": per_token,
                "theoretical_bytes": per_token * self.peak_live_tokens,
            },
        }


def run_engine_closed_loop(engine, prompts: Sequence[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Run ``prompts`` through ``engine`` keeping ``concurrency`` in flight; return the row's figures."""
    loop = _ClosedLoop(engine, prompts, concurrency, max_tokens)
    rss_reset = reset_peak_rss()
    start = time.monotonic()
    while loop.queue or loop.live:
        loop.admit()
        if loop.live:
            loop.step()
    wall_s = time.monotonic() - start
    after = engine.stats()
    row = summarize(loop.traces, wall_s)
    row.update(peak_rss_bytes=peak_rss_bytes(), peak_rss_scope="run" if rss_reset else "process")
    row.update(loop.engine_figures(after))
    return row


def _engine_info(args: argparse.Namespace, engine, build_s: float) -> dict[str, Any]:
    """What the result records about the engine: model, device, KV cache geometry, scheduler limits, build time."""
    return {
        "model": args.model,
        "model_dir": str(engine.model_dir),
        "device": str(engine.runner.device),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "weights": engine.runner.weight_format.name,
        "num_layers": engine.arch.num_layers,
        "num_kv_heads": engine.arch.num_kv_heads,
        "head_dim": engine.arch.head_dim,
        "block_size": engine.config.cache.block_size,
        "kv_cache_bytes": engine.runner.kv_cache_bytes,
        "kv_blocks_total": engine.stats().kv_blocks_total,
        "max_num_seqs": engine.config.scheduler.max_num_seqs,
        "max_num_batched_tokens": engine.config.scheduler.max_num_batched_tokens,
        "compiled_decode": engine.runner.compiled is not None,
        "build_s": build_s,
    }


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
        engine = LLMEngine(_engine_config(args, concurrency), progress=False)
        build_s = time.monotonic() - started
        if not info:
            tokenizer = Tokenizer.from_dir(engine.model_dir)
            prompt_ids = [tokenizer.encode_chat(messages) for messages in prompt_messages]
            warm_ids = tokenizer.encode(WARM_UP_TEXT)
            info = _engine_info(args, engine, build_s)
        compile_s = _warm_up(engine, warm_ids)
        requests = take(prompt_ids, args.requests)
        log(f"engine c={concurrency}: {len(requests)} requests x {args.max_tokens} tokens ...")
        row = {"name": f"engine c={concurrency}", "kind": "engine", "concurrency": concurrency}
        if engine.runner.compiled is not None:
            row["compile_wait_s"] = compile_s
        row.update(run_engine_closed_loop(engine, requests, concurrency, args.max_tokens))
        log(f"  {row['output_tokens_per_s']:.1f} tok/s, {row['completed']}/{row['requests']} completed")
        rows.append(row)
        del engine
        gc.collect()
    return rows, info, prompt_ids
