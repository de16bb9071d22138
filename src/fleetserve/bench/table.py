"""Fixed-width text tables of benchmark rows: the layout, and the columns and cell formats both benchmarks share."""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.bench.memory import MiB

COUNT_HEADER = ("scenario", "done", "fail", "out tok", "wall s", "tok/s")
"""Headers of the cells of ``count_cells``."""

LATENCY_HEADER = ("TTFT p50/p90/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 s")
"""Headers of the cells of ``latency_cells``."""


def ms(value: float | None) -> str:
    """Seconds as whole milliseconds ("-" for None)."""
    return "-" if value is None else f"{value * 1000:.0f}"


def seconds(value: float | None) -> str:
    """Seconds with two decimals ("-" for None)."""
    return "-" if value is None else f"{value:.2f}"


def mib(value: int | None) -> str:
    """Bytes as whole MiB ("-" for None)."""
    return "-" if value is None else f"{value / MiB:.0f}"


def pct(value: float) -> str:
    """A fraction as a whole percentage."""
    return f"{100 * value:.0f}%"


def count_cells(row: dict) -> tuple[str, ...]:
    """A row's name, request counts, output tokens, wall time and throughput."""
    return (
        row["name"],
        str(row["completed"]),
        str(row["failed"]),
        str(row["output_tokens"]),
        f"{row['wall_s']:.2f}",
        f"{row['output_tokens_per_s']:.1f}",
    )


def latency_cells(row: dict) -> tuple[str, ...]:
    """A row's TTFT, ITL (ms) and end-to-end (s) percentiles, each column's figures joined by slashes."""
    ttft, itl, e2e = row["ttft_s"], row["itl_s"], row["e2e_s"]
    return (
        "/".join(ms(ttft[p]) for p in ("p50", "p90", "p99")),
        "/".join(ms(itl[p]) for p in ("p50", "p99")),
        "/".join(seconds(e2e[p]) for p in ("p50", "p99")),
    )


def render_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The header, a rule and the body lines; the first column left-aligned, the others right-aligned."""
    table = [tuple(header), *(tuple(line) for line in body)]
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
