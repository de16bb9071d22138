"""Tests of the engine benchmark: the percentile helper, the table, and a tiny end-to-end run of ``run()``."""

from __future__ import annotations

import argparse
import json

import pytest

from fleetserve.bench import engine_bench
from fleetserve.bench.traces import RequestTrace, percentile, summarize


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine_bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_percentile_interpolates_linearly():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_summarize_counts_and_latencies():
    done = RequestTrace("a", 5, arrival=0.0, first_token=0.5, token_times=[0.5, 0.7, 1.0], output_tokens=3)
    done.finish_time, done.finish_reason = 1.0, "length"
    failed = RequestTrace("b", 4, error="CapacityError: full", finish_reason="error")
    row = summarize([done, failed], wall_s=2.0)
    assert (row["requests"], row["completed"], row["failed"]) == (2, 1, 1)
    assert row["output_tokens"] == 3 and row["prompt_tokens"] == 9
    assert row["output_tokens_per_s"] == pytest.approx(1.5)
    assert row["ttft_s"]["p50"] == pytest.approx(0.5)
    assert row["itl_s"]["p50"] == pytest.approx(0.25)
    assert row["e2e_s"]["p99"] == pytest.approx(1.0)
    assert row["errors"] == ["CapacityError: full"]


def test_concurrency_option_is_validated():
    assert parse(["--concurrency", "1,4,16"]).concurrency == [1, 4, 16]
    with pytest.raises(SystemExit):
        parse(["--concurrency", "0,2"])


@pytest.mark.slow
def test_run_writes_result(tmp_path, capsys):
    out = tmp_path / "x.json"
    args = parse(
        ["--requests", "3", "--max-tokens", "4", "--concurrency", "1,2", "--no-transformers", "--kv-cache-mb", "16"]
        + ["--no-compile"]
        + ["--output", str(out)]
    )
    result = engine_bench.run(args)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["scenario"] == "chat"
    assert data["engine"]["kv_cache_bytes"] > 0
    rows = data["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    assert all(row["kind"] == "engine" for row in rows)
    for row in rows:
        assert row["completed"] == 3 and row["failed"] == 0
        assert row["output_tokens"] == 12
        assert row["output_tokens_per_s"] > 0
        assert set(row["ttft_s"]) == {"p50", "p90", "p99"} and set(row["itl_s"]) == {"p50", "p99"}
        assert 0 < row["ttft_s"]["p50"] <= row["e2e_s"]["p99"]
        assert row["itl_s"]["p50"] > 0
        assert row["peak_rss_bytes"] > 0
        kv = row["kv"]
        assert kv["allocated_bytes"] == data["engine"]["kv_cache_bytes"]
        assert 0 < kv["peak_blocks_used"] <= kv["blocks_total"]
        assert kv["theoretical_bytes"] == kv["bytes_per_token"] * kv["peak_live_tokens"] > 0
        assert row["ratio_vs_transformers"] is None
    assert data["headline"][0].startswith("c=1: ")
    assert "c=2:" in capsys.readouterr().out
