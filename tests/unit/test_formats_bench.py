"""The formats benchmark's ratios: end to end against the engine alone within each round, then the median."""

import argparse

import pytest

from fleetserve.bench.formats_bench import end_to_end_by_round, ratios, stream_interval_list


def _row(kind, c, tps, turn=None):
    row = {"kind": kind, "concurrency": c, "output_tokens_per_s": tps}
    if turn is not None:
        row["round"] = turn
    return row


def test_end_to_end_is_compared_with_the_engine_of_its_own_round():
    rows = [
        _row("up int4", 16, 300, 0),
        _row("engine int4", 16, 400, 0),
        _row("up int4", 16, 380, 1),
        _row("engine int4", 16, 400, 1),
        _row("up int4", 16, 342, 2),
        _row("engine int4", 16, 360, 2),
        _row("up int4", 1, 90, 0),  # no engine row at c=1: no ratio
    ]
    assert end_to_end_by_round(rows) == {"int4 c=16": pytest.approx([0.75, 0.95, 0.95])}
    out = ratios(rows)
    assert out["int4 c=16 end to end / engine alone"] == pytest.approx(0.95)
    assert "int4 c=1 end to end / engine alone" not in out


def test_peers_are_compared_with_the_median_of_the_rounds():
    rows = [
        _row("up int4", 16, 300, 0),
        _row("up int4", 16, 360, 1),
        _row("up int4", 16, 320, 2),
        _row("llama-server", 16, 160),
        _row("transformers", 1, 16),
        _row("up int4", 1, 96, 0),
    ]
    out = ratios(rows)
    assert out["int4 c=16 / llama-server"] == pytest.approx(2.0)
    assert out["int4 c=16 / transformers sequential"] == pytest.approx(20.0)
    assert out["int4 c=1 / transformers sequential"] == pytest.approx(6.0)
    assert "int4 c=1 / llama-server" not in out


def test_a_fleet_with_a_stream_interval_is_compared_with_its_formats_engine():
    rows = [
        _row("up int4", 1, 80, 0),
        _row("up int4 interval 4", 1, 95, 0),
        _row("engine int4", 1, 100, 0),
    ]
    assert end_to_end_by_round(rows) == {"int4 c=1": [0.8], "int4 interval 4 c=1": [0.95]}
    assert ratios(rows)["int4 interval 4 c=1 end to end / engine alone"] == pytest.approx(0.95)


def test_stream_intervals_are_integers_or_the_workers_default():
    assert stream_interval_list("default,1,4") == [None, 1, 4]
    for bad in ("0", "", "often"):
        with pytest.raises(argparse.ArgumentTypeError):
            stream_interval_list(bad)
