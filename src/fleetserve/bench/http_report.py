"""The HTTP benchmark's report: a level's rows, their table, the gateway-overhead comparison and the headline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fleetserve.bench.load import Load
from fleetserve.bench.table import COUNT_HEADER, LATENCY_HEADER, count_cells, latency_cells, pct, render_table
from fleetserve.bench.traces import StreamTrace, summarize

OVERHEAD_GOALS: dict[str, float] = {"max_throughput_loss": 0.05, "max_ttft_p50_increase_s": 0.005}
"""gateway-overhead: the gateway may cost at most 5% of the direct throughput and 5 ms of TTFT p50."""


def make_row(name: str, kind: str, load: Load, traces: Sequence[StreamTrace], wall_s: float, max_tokens: int) -> dict:
    """summarize's figures plus the load, cached prompt tokens, short answers and error counts."""
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "load": "closed" if load.concurrency is not None else "poisson",
        "concurrency": load.concurrency,
        "request_rate": load.rate,
    }
    row.update(summarize(traces, wall_s))
    cached = sum(t.cached_tokens for t in traces)
    row["cached_tokens"] = cached
    row["prefix_cache_hit_rate"] = cached / row["prompt_tokens"] if row["prompt_tokens"] else 0.0
    row["short_requests"] = sum(1 for t in traces if t.completed and t.output_tokens < max_tokens)
    row["error_counts"] = dict(
        Counter(t.error or f"finish_reason={t.finish_reason}" for t in traces if not t.completed)
    )
    return row


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table in the engine benchmark's style (TTFT and ITL in ms, end-to-end in s)."""
    header = (*COUNT_HEADER, *LATENCY_HEADER, "cached")
    body = [(*count_cells(row), *latency_cells(row), pct(row["prefix_cache_hit_rate"])) for row in rows]
    return render_table(header, body)


def compare(gateway: dict, direct: dict) -> dict[str, Any]:
    """The gateway-overhead figures of one load level: throughput ratio and TTFT p50 difference, against the goals."""
    g_tps, d_tps = gateway["output_tokens_per_s"], direct["output_tokens_per_s"]
    g_ttft, d_ttft = gateway["ttft_s"]["p50"], direct["ttft_s"]["p50"]
    ratio = g_tps / d_tps if d_tps > 0 else None
    diff = g_ttft - d_ttft if g_ttft is not None and d_ttft is not None else None
    return {
        "load": gateway["name"].split(" ", 1)[1],
        "gateway_output_tokens_per_s": g_tps,
        "direct_output_tokens_per_s": d_tps,
        "throughput_ratio": ratio,
        "throughput_loss": None if ratio is None else 1 - ratio,
        "ttft_p50_gateway_s": g_ttft,
        "ttft_p50_direct_s": d_ttft,
        "ttft_p50_diff_s": diff,
        "meets_throughput_goal": None if ratio is None else 1 - ratio <= OVERHEAD_GOALS["max_throughput_loss"],
        "meets_ttft_goal": None if diff is None else diff <= OVERHEAD_GOALS["max_ttft_p50_increase_s"],
    }


def comparison_line(c: dict) -> str:
    """One comparison as a line of text, with each goal met or not."""

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    ratio = "-" if c["throughput_ratio"] is None else f"{c['throughput_ratio']:.3f}"
    diff = "-" if c["ttft_p50_diff_s"] is None else f"{c['ttft_p50_diff_s'] * 1000:+.1f} ms"
    return (
        f"gateway-overhead {c['load']}: throughput gateway/direct = {ratio} "
        f"(goal >= {1 - OVERHEAD_GOALS['max_throughput_loss']:.2f}: {verdict(c['meets_throughput_goal'])}), "
        f"TTFT p50 gateway - direct = {diff} "
        f"(goal <= {OVERHEAD_GOALS['max_ttft_p50_increase_s'] * 1000:g} ms: {verdict(c['meets_ttft_goal'])})"
    )


def headline(rows: Sequence[dict], comparisons: Sequence[dict]) -> list[str]:
    """One line per row (throughput, completed, short answers), then one per comparison."""
    lines = [
        f"{row['name']}: {row['output_tokens_per_s']:.1f} tok/s, {row['completed']}/{row['requests']} completed"
        + (f", {row['short_requests']} short of max_tokens" if row["short_requests"] else "")
        for row in rows
    ]
    return lines + [comparison_line(c) for c in comparisons]
