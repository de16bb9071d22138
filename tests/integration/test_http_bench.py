"""The HTTP load generator against a real one-worker fleet: closed-loop levels, and the gateway-overhead scenario."""

from __future__ import annotations

import json

import pytest

from fleetserve.bench import http_bench
from fleetserve.protocol.security import SECRET_ENV
from tests.fleet import FLEET_SECRET, READY_WORKER, start_fleet

pytestmark = pytest.mark.slow

TINY = ["--requests", "3", "--max-tokens", "4"]


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(workers=1)
    yield f
    f.stop()


def _check_row(row: dict, requests: int, tokens: int) -> None:
    assert row["completed"] == requests and row["failed"] == 0, row["errors"]
    assert row["output_tokens"] == requests * tokens and row["short_requests"] == 0
    assert row["prompt_tokens"] > 0 and row["output_tokens_per_s"] > 0
    for key, qs in (("ttft_s", ("p50", "p90", "p99")), ("itl_s", ("p50", "p99")), ("e2e_s", ("p50", "p99"))):
        assert all(isinstance(row[key][q], float) and row[key][q] > 0 for q in qs), (key, row[key])
    assert row["ttft_s"]["p50"] <= row["e2e_s"]["p99"]


def test_closed_loop_levels(fleet, tmp_path):
    output = tmp_path / "http-chat.json"
    args = http_bench.build_parser().parse_args(
        ["--url", fleet.url, *TINY, "--concurrency", "1,2", "--output", str(output)]
    )
    result = http_bench.run(args)
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["scenario"] == "chat" and written["gateway"]["healthy_workers"] == 1
    assert [row["concurrency"] for row in written["rows"]] == [1, 2]
    for row in written["rows"]:
        assert row["kind"] == "http"
        _check_row(row, 3, 4)


def test_gateway_overhead(fleet, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, FLEET_SECRET)  # the direct side dials the worker with the fleet secret
    address = fleet.workers[0].wait_for(READY_WORKER).group(2)
    output = tmp_path / "http-gateway-overhead.json"
    args = http_bench.build_parser().parse_args(
        ["--url", fleet.url, "--scenario", "gateway-overhead", "--worker", address, *TINY, "--output", str(output)]
    )
    written = json.loads(json.dumps(http_bench.run(args)))
    assert written == json.loads(output.read_text())
    gateway, direct = written["rows"]
    assert (gateway["kind"], direct["kind"]) == ("http", "grpc")
    assert gateway["concurrency"] == direct["concurrency"] == 16
    for row in (gateway, direct):
        _check_row(row, 3, 4)
    # Same prompts on both sides (each with its own prefix-cache tag of the same length).
    assert gateway["prompt_tokens"] == direct["prompt_tokens"] and gateway["salt"] != direct["salt"]
    (comparison,) = written["comparisons"]
    assert comparison["throughput_ratio"] > 0 and comparison["ttft_p50_diff_s"] is not None
    assert written["worker"]["address"] == address


def test_gateway_overhead_needs_a_worker():
    args = http_bench.build_parser().parse_args(["--scenario", "gateway-overhead"])
    with pytest.raises(http_bench.BenchError, match="--worker"):
        http_bench.run(args)
