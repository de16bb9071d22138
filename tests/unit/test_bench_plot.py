"""Benchmark charts: rows shaped like the HTTP and engine benchmarks' make one PNG."""

from __future__ import annotations

import argparse
import builtins

import pytest

from fleetserve.bench import http_bench
from fleetserve.bench.plot import load_level, plot_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def http_row(kind: str, concurrency: int | None, tps: float, rate: float | None = None) -> dict:
    scale = concurrency or 1
    return {
        "name": f"{kind} c={concurrency}" if concurrency else f"{kind} rate={rate:g}/s",
        "kind": kind,
        "load": "closed" if concurrency is not None else "poisson",
        "concurrency": concurrency,
        "request_rate": rate,
        "requests": 16,
        "completed": 16,
        "failed": 0,
        "errors": [],
        "prompt_tokens": 1000,
        "output_tokens": 1024,
        "wall_s": 10.0,
        "output_tokens_per_s": tps,
        "ttft_s": {"p50": 0.1 * scale, "p90": 0.15 * scale, "p99": 0.2 * scale},
        "itl_s": {"p50": 0.03, "p99": 0.05},
        "e2e_s": {"p50": 2.0 * scale, "p99": 2.5 * scale},
        "cached_tokens": 0,
        "prefix_cache_hit_rate": 0.0,
        "short_requests": 0,
        "error_counts": {},
    }


def engine_row(kind: str, concurrency: int, tps: float) -> dict:
    row = http_row(kind, concurrency, tps)
    for key in ("load", "request_rate", "cached_tokens", "short_requests", "error_counts"):
        del row[key]
    row["name"] = f"engine c={concurrency}" if kind == "engine" else "transformers"
    return row


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_http_rows_make_a_png(tmp_path):
    rows = [http_row("http", c, 20.0 * c) for c in (1, 4, 16)]
    out = plot_rows(rows, tmp_path / "charts" / "http.png", "HTTP chat")
    assert out == tmp_path / "charts" / "http.png"
    assert_png(out)


def test_gateway_overhead_and_engine_rows_make_a_png(tmp_path):
    overhead = [http_row("http", 16, 160.0), http_row("grpc", 16, 170.0)]
    assert_png(plot_rows(overhead, tmp_path / "overhead.png", "gateway overhead"))
    engine = [engine_row("engine", c, 25.0 * c) for c in (1, 4, 16, 64)] + [engine_row("transformers", 1, 18.0)]
    assert_png(plot_rows(engine, tmp_path / "engine.png", "engine"))


def test_failed_levels_and_open_loop_rows_still_plot(tmp_path):
    failed = http_row("http", 4, 0.0)
    failed["ttft_s"] = {"p50": None, "p90": None, "p99": None}
    failed["e2e_s"] = {"p50": None, "p99": None}
    assert_png(plot_rows([http_row("http", 1, 20.0), failed], tmp_path / "failed.png", "with a failed level"))
    assert_png(plot_rows([http_row("http", None, 30.0, rate=2.5)], tmp_path / "rate.png", "open loop"))


def test_load_level():
    assert load_level({"concurrency": 4, "load": "closed"}) == ("concurrency", 4.0)
    assert load_level({"concurrency": None, "load": "poisson", "request_rate": 2.5}) == ("rate", 2.5)
    assert load_level({"load": "c=8"}) == ("concurrency", 8.0)
    assert load_level({"load": {"concurrency": 2}}) == ("concurrency", 2.0)
    assert load_level({"name": "x"}) is None


def test_no_plottable_rows(tmp_path):
    with pytest.raises(ValueError):
        plot_rows([{"name": "x"}], tmp_path / "none.png", "nothing")


def test_missing_matplotlib_names_the_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_rows([http_row("http", 1, 20.0)], tmp_path / "x.png", "x")


def test_http_bench_has_plot_option(tmp_path):
    parser = argparse.ArgumentParser()
    http_bench.add_arguments(parser)
    assert parser.parse_args([]).plot is None
    assert parser.parse_args(["--plot", str(tmp_path / "p.png")]).plot == tmp_path / "p.png"
