"""The engine benchmark's report: the goals against transformers, the table, the headline lines and the chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fleetserve.bench.memory import MiB
from fleetserve.bench.table import COUNT_HEADER, LATENCY_HEADER, count_cells, latency_cells, mib, render_table

GOALS: dict[int, float] = {1: 2.0, 16: 14.0, 64: 25.0}
"""Engine tokens/s over transformers tokens/s wanted at these concurrencies (the headline of the benchmark)."""


def apply_goals(engine_rows: Sequence[dict], hf_row: dict | None) -> None:
    """Give every engine row its ratio to the transformers baseline, its goal and whether it meets the goal."""
    baseline = hf_row["output_tokens_per_s"] if hf_row and hf_row["completed"] else None
    for row in engine_rows:
        row["ratio_vs_transformers"] = row["output_tokens_per_s"] / baseline if baseline else None
        row["goal_ratio"] = GOALS.get(row["concurrency"])
        row["meets_goal"] = (
            None
            if row["goal_ratio"] is None or row["ratio_vs_transformers"] is None
            else row["ratio_vs_transformers"] >= row["goal_ratio"]
        )


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows (TTFT and ITL in ms, end-to-end in s, memory in MiB)."""
    header = (*COUNT_HEADER, "x HF", *LATENCY_HEADER, "RSS MiB", "KV blk peak/total", "KV theo MiB")
    body = []
    for row in rows:
        kv = row.get("kv")
        ratio = row.get("ratio_vs_transformers")
        body.append(
            (
                *count_cells(row),
                "-" if ratio is None else f"{ratio:.1f}x",
                *latency_cells(row),
                mib(row.get("peak_rss_bytes")),
                f"{kv['peak_blocks_used']}/{kv['blocks_total']}" if kv else "-",
                f"{kv['theoretical_bytes'] / MiB:.1f}" if kv else "-",
            )
        )
    return render_table(header, body)


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


def write_chart(rows: Sequence[dict], path: Path, scenario: str) -> Path | None:
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
    ax.set_title(f"fleetserve engine, {scenario} scenario")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
