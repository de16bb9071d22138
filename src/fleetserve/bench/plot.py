"""Charts of benchmark rows: latency percentiles and throughput per load level.

Works on the rows of both benchmarks: the HTTP benchmark's (``make_row``: ``kind`` "http" or "grpc", ``concurrency``
for a closed loop or ``request_rate`` for an open one) and the engine benchmark's (``kind`` "engine" or
"transformers", ``concurrency``). Every row has ``ttft_s`` and ``e2e_s`` dicts of percentiles (``"p50"``, ``"p99"``;
None where no request got that far) and ``output_tokens_per_s``. Rows of one ``kind`` form one series.

matplotlib is imported only when a chart is drawn (with the Agg backend, so no display is needed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LATENCIES: tuple[tuple[str, str, str, str], ...] = (
    ("ttft_s", "p50", "TTFT p50", "-"),
    ("ttft_s", "p99", "TTFT p99", "--"),
    ("e2e_s", "p50", "E2E p50", "-."),
    ("e2e_s", "p99", "E2E p99", ":"),
)
"""(row key, percentile, legend label, line style) of each latency line."""

_LABEL = re.compile(r"^\s*(?:c\s*=\s*)?(\d+)\s*$")


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting benchmark results needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_level(row: dict[str, Any]) -> tuple[str, float] | None:
    """("concurrency", c) or ("rate", requests/s) of a row; None when it names neither."""
    concurrency = row.get("concurrency")
    if isinstance(concurrency, (int, float)) and not isinstance(concurrency, bool):
        return "concurrency", float(concurrency)
    load = row.get("load")
    if isinstance(load, dict):
        return load_level(load)
    if isinstance(load, (int, float)) and not isinstance(load, bool):
        return "concurrency", float(load)
    if isinstance(load, str) and (match := _LABEL.match(load)):
        return "concurrency", float(match.group(1))
    rate = row.get("request_rate")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        return "rate", float(rate)
    return None


def _value(row: dict[str, Any], key: str, percentile: str | None = None) -> float:
    value = row.get(key)
    if percentile is not None:
        value = value.get(percentile) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _minor_label(value: float, _position: Any = None) -> str:
    """Label the minor ticks of a log axis at 2 and 5 times a power of ten only, so that they do not crowd."""
    if not value > 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(leading, d, rel_tol=1e-6) for d in (2, 5)) else ""


def _series(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, list[tuple[float, dict]]], set[str]]:
    """The rows with a load level, grouped by kind and sorted by level; and the kinds of level seen."""
    series: dict[str, list[tuple[float, dict]]] = {}
    modes: set[str] = set()
    for row in rows:
        level = load_level(row)
        if level is None:
            continue
        modes.add(level[0])
        series.setdefault(str(row.get("kind") or "run"), []).append((level[1], row))
    for points in series.values():
        points.sort(key=lambda point: point[0])
    return series, modes


def plot_rows(rows: Sequence[dict[str, Any]], out: Path | str, title: str) -> Path:
    """Draw one PNG at ``out``: latency percentiles (left) and output tokens/s (right) per load level.

    Raises ImportError (saying ``pip install matplotlib``) when matplotlib is missing, ValueError when no row has
    a load level.
    """
    series, modes = _series(rows)
    if not series:
        raise ValueError("no benchmark row has a concurrency or a request rate to plot against")
    plt = _import_pyplot()
    from matplotlib.ticker import FuncFormatter, NullLocator

    out = Path(out)
    xlabel = {"concurrency": "concurrency", "rate": "request rate (requests/s)"}.get(
        next(iter(modes)) if len(modes) == 1 else "", "concurrency / request rate"
    )
    levels = sorted({x for points in series.values() for x, _ in points})
    log_x = levels[0] > 0
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0", "C1", "C2", "C3"]
    several = len(series) > 1

    fig, (lat_ax, tput_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for index, (kind, points) in enumerate(series.items()):
        color = colors[index % len(colors)]
        # Series side by side at each level (a small multiplicative nudge), so that equal levels do not overlap.
        nudge = 2 ** (0.05 * (index - (len(series) - 1) / 2))
        xs = [x * nudge for x, _ in points]
        for key, percentile, label, style in LATENCIES:
            lat_ax.plot(
                xs,
                [_value(row, key, percentile) for _, row in points],
                linestyle=style,
                marker="o" if key == "ttft_s" else "s",
                color=color,
                label=f"{kind} {label}" if several else label,
            )
        tput_ax.plot(xs, [_value(row, "output_tokens_per_s") for _, row in points], marker="o", color=color, label=kind)

    lat_ax.set_yscale("log")
    lat_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lat_ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    lat_ax.set_ylabel("latency (s)")
    lat_ax.set_title("latency percentiles")
    tput_ax.set_ylabel("output tokens/s")
    tput_ax.set_title("throughput")
    throughputs = [_value(row, "output_tokens_per_s") for points in series.values() for _, row in points]
    top = max((v for v in throughputs if math.isfinite(v)), default=0.0)
    tput_ax.set_ylim(0, top * 1.15 or 1.0)
    for ax in (lat_ax, tput_ax):
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xlim(levels[0] / 1.5, levels[-1] * 1.5)
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{x:g}" for x in levels])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    # Below the panels, where they hide no data: one row per series on the left, one row in all on the right.
    lat_ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(LATENCIES))
    tput_ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(series), 4))
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleetserve.bench.plot RESULT.json OUT.png``: redraw a saved benchmark result."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m fleetserve.bench.plot", description=main.__doc__)
    parser.add_argument("result", type=Path, help="a JSON result of fleetserve bench or benchmarks/engine.py")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--title", default=None, help="title (default: the result's benchmark and scenario)")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text(encoding="utf-8"))
    title = args.title or " ".join(str(result.get(k, "")) for k in ("benchmark", "scenario")).strip()
    plot_rows(result["rows"], args.out, title or args.result.stem)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
