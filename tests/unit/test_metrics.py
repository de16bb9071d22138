"""The gateway's and the worker's Prometheus metrics: names, values, the worker gauges and the HTTP endpoint."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.telemetry.fleet_gauges import WORKER_STATES
from fleetserve.telemetry.metrics import GatewayMetrics, WorkerMetrics


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, keyed by (sample name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(body: bytes, name: str, **labels: str) -> float | None:
    return samples(body).get((name, tuple(sorted(labels.items()))))


def family_names(body: bytes) -> set[str]:
    return {family.name for family in text_string_to_metric_families(body.decode("utf-8"))}


# -- gateway ----------------------------------------------------------------------------------------------


def test_gateway_render_content_type_and_prefix():
    metrics = GatewayMetrics()
    metrics.requests_total.labels(model="m", outcome="ok").inc()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    names = family_names(body)
    assert names
    assert all(name.startswith("fleetserve_") for name in names)


def test_gateway_counters_and_histograms_move_by_n():
    metrics = GatewayMetrics()
    before, _ = metrics.render()
    n = 7
    for i in range(n):
        metrics.requests_total.labels(model="m", outcome="ok").inc()
        metrics.time_to_first_token_seconds.labels(model="m").observe(0.05 * (i + 1))
        metrics.inter_token_latency_seconds.labels(model="m").observe(0.02)
        metrics.e2e_request_latency_seconds.labels(model="m").observe(1.5)
        metrics.queue_time_seconds.labels(model="m").observe(0.001)
        metrics.prompt_tokens_total.labels(model="m").inc(10)
        metrics.generation_tokens_total.labels(model="m").inc(3)
        metrics.response_cache_hits_total.labels(model="m").inc()
        metrics.response_cache_misses_total.labels(model="m").inc()
        metrics.retries_total.labels(model="m").inc()
        metrics.failovers_total.labels(model="m").inc()
        metrics.prefix_cache_predicted_tokens_total.labels(model="m").inc(16)
        metrics.prefix_cache_hit_tokens_total.labels(model="m").inc(8)
    metrics.requests_total.labels(model="m", outcome="rejected").inc()
    metrics.requests_running.labels(model="m").set(3)
    metrics.requests_waiting.labels(model="m").set(2)
    body, _ = metrics.render()

    assert value(before, "fleetserve_requests_total", model="m", outcome="ok") is None
    assert value(body, "fleetserve_requests_total", model="m", outcome="ok") == n
    assert value(body, "fleetserve_requests_total", model="m", outcome="rejected") == 1
    for hist in (
        "fleetserve_time_to_first_token_seconds",
        "fleetserve_inter_token_latency_seconds",
        "fleetserve_e2e_request_latency_seconds",
        "fleetserve_queue_time_seconds",
    ):
        assert value(body, f"{hist}_count", model="m") == n
        assert value(body, f"{hist}_bucket", model="m", le="+Inf") == n
    assert value(body, "fleetserve_time_to_first_token_seconds_sum", model="m") == pytest.approx(0.05 * 28)
    assert value(body, "fleetserve_time_to_first_token_seconds_bucket", model="m", le="0.1") == 2
    assert value(body, "fleetserve_e2e_request_latency_seconds_bucket", model="m", le="60.0") == n
    assert value(body, "fleetserve_queue_time_seconds_bucket", model="m", le="0.005") == n
    assert value(body, "fleetserve_prompt_tokens_total", model="m") == 10 * n
    assert value(body, "fleetserve_generation_tokens_total", model="m") == 3 * n
    assert value(body, "fleetserve_response_cache_hits_total", model="m") == n
    assert value(body, "fleetserve_response_cache_misses_total", model="m") == n
    assert value(body, "fleetserve_retries_total", model="m") == n
    assert value(body, "fleetserve_failovers_total", model="m") == n
    assert value(body, "fleetserve_prefix_cache_predicted_tokens_total", model="m") == 16 * n
    assert value(body, "fleetserve_prefix_cache_hit_tokens_total", model="m") == 8 * n
    assert value(body, "fleetserve_requests_running", model="m") == 3
    assert value(body, "fleetserve_requests_waiting", model="m") == 2


def test_two_instances_do_not_share_state():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.requests_total.labels(model="m", outcome="ok").inc(5)
    body, _ = b.render()
    assert value(body, "fleetserve_requests_total", model="m", outcome="ok") is None
    body, _ = a.render()
    assert value(body, "fleetserve_requests_total", model="m", outcome="ok") == 5


class State:
    def __init__(self, value: str):
        self.value = value


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass
class Record:
    name: str
    model: str
    state: str
    stats: Stats = field(default_factory=Stats)
    recent_first_token_s: float = 0.0
    recent_inter_token_s: float = 0.0

    def __post_init__(self):
        self.info = SimpleNamespace(model=self.model)
        self.state = State(self.state)


def test_worker_gauges_from_records():
    workers = [
        Record("alpha", "m1", "healthy", Stats(2, 1, 30, 120, 400, 1000), 0.25, 0.04),
        Record("beta", "m1", "suspect", Stats(0, 0, 0, 0, 0, 0)),
        Record("gamma", "m2", "draining", Stats(5, 7, 60, 60, 9, 10), 1.5, 0.1),
    ]
    metrics = GatewayMetrics()
    metrics.set_worker_source(lambda: workers)
    body, _ = metrics.render()

    for record in workers:
        for state in WORKER_STATES:
            got = value(body, "fleetserve_worker_state", worker=record.name, model=record.model, state=state)
            assert got == (1.0 if state == record.state.value else 0.0), (record.name, state)
    alpha = {"worker": "alpha", "model": "m1"}
    assert value(body, "fleetserve_worker_running", **alpha) == 2
    assert value(body, "fleetserve_worker_waiting", **alpha) == 1
    assert value(body, "fleetserve_worker_kv_cache_usage_ratio", **alpha) == pytest.approx(0.25)
    assert value(body, "fleetserve_worker_prefix_cache_hits_total", **alpha) == 400
    assert value(body, "fleetserve_worker_prefix_cache_queries_total", **alpha) == 1000
    assert value(body, "fleetserve_worker_recent_ttft_seconds", **alpha) == pytest.approx(0.25)
    assert value(body, "fleetserve_worker_recent_itl_seconds", **alpha) == pytest.approx(0.04)
    beta = {"worker": "beta", "model": "m1"}
    assert value(body, "fleetserve_worker_kv_cache_usage_ratio", **beta) == 0.0  # no blocks: no division by zero
    gamma = {"worker": "gamma", "model": "m2"}
    assert value(body, "fleetserve_worker_kv_cache_usage_ratio", **gamma) == 1.0
    assert value(body, "fleetserve_worker_waiting", **gamma) == 7

    # Read at every scrape: a state change and a removal show at the next one.
    workers[0].state = State("dead")
    del workers[2]
    body, _ = metrics.render()
    assert value(body, "fleetserve_worker_state", worker="alpha", model="m1", state="dead") == 1
    assert value(body, "fleetserve_worker_state", worker="alpha", model="m1", state="healthy") == 0
    assert value(body, "fleetserve_worker_running", worker="gamma", model="m2") is None


def test_worker_gauges_without_source_or_with_a_broken_one():
    metrics = GatewayMetrics()
    body, _ = metrics.render()
    assert not any(name.startswith("fleetserve_worker_") for name, _ in samples(body))

    def broken():
        raise RuntimeError("boom")

    metrics.set_worker_source(broken)
    metrics.requests_total.labels(model="m", outcome="ok").inc()
    body, _ = metrics.render()  # the rest of the scrape still works
    assert value(body, "fleetserve_requests_total", model="m", outcome="ok") == 1


def test_worker_state_unknown_value_and_duplicate_names():
    workers = [
        Record("alpha", "m1", "dead", Stats(running=9)),
        Record("alpha", "m1", "healthy", Stats(running=1)),
        Record("beta", "m1", "starting"),
    ]
    metrics = GatewayMetrics()
    metrics.set_worker_source(lambda: iter(workers))
    body, _ = metrics.render()
    assert value(body, "fleetserve_worker_running", worker="alpha", model="m1") == 1  # the live record wins
    assert value(body, "fleetserve_worker_state", worker="alpha", model="m1", state="healthy") == 1
    assert value(body, "fleetserve_worker_state", worker="beta", model="m1", state="starting") == 1
    assert value(body, "fleetserve_worker_state", worker="beta", model="m1", state="healthy") == 0


# -- worker -----------------------------------------------------------------------------------------------


def engine_stats(**overrides):
    figures = dict(
        running=3,
        waiting=4,
        kv_blocks_used=25,
        kv_blocks_total=100,
        prefix_cache_queries=200,
        prefix_cache_hits=50,
        num_preemptions=2,
        steps=1234,
        spec_draft_tokens=40,
        spec_accepted_tokens=30,
        decode_graphs_ready=2,
        decode_graphs_pending=5,
    )
    figures.update(overrides)
    return SimpleNamespace(**figures)


def test_worker_metrics_engine_figures_and_counters():
    stats = engine_stats()
    metrics = WorkerMetrics(lambda: stats)
    n = 5
    for _ in range(n):
        metrics.requests_total.labels(outcome="ok").inc()
        metrics.generation_tokens_total.inc(4)
        metrics.time_to_first_token_seconds.observe(0.2)
    metrics.requests_total.labels(outcome="error").inc()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    assert all(name.startswith("fleetserve_engine_") for name in family_names(body))
    assert value(body, "fleetserve_engine_running") == 3
    assert value(body, "fleetserve_engine_waiting") == 4
    assert value(body, "fleetserve_engine_kv_cache_usage_ratio") == pytest.approx(0.25)
    assert value(body, "fleetserve_engine_prefix_cache_queries_total") == 200
    assert value(body, "fleetserve_engine_prefix_cache_hits_total") == 50
    assert value(body, "fleetserve_engine_preemptions_total") == 2
    assert value(body, "fleetserve_engine_steps_total") == 1234
    assert value(body, "fleetserve_engine_decode_graphs", state="ready") == 2
    assert value(body, "fleetserve_engine_decode_graphs", state="pending") == 5
    assert value(body, "fleetserve_engine_spec_draft_tokens_total") == 40
    assert value(body, "fleetserve_engine_spec_accepted_tokens_total") == 30
    assert value(body, "fleetserve_engine_requests_total", outcome="ok") == n
    assert value(body, "fleetserve_engine_requests_total", outcome="error") == 1
    assert value(body, "fleetserve_engine_generation_tokens_total") == 4 * n
    assert value(body, "fleetserve_engine_time_to_first_token_seconds_count") == n

    stats.steps, stats.kv_blocks_total = 2000, 0  # read at scrape time; an empty cache divides by nothing
    body, _ = metrics.render()
    assert value(body, "fleetserve_engine_steps_total") == 2000
    assert value(body, "fleetserve_engine_kv_cache_usage_ratio") == 0.0


def test_worker_metrics_survive_failing_engine_stats():
    def broken():
        raise RuntimeError("engine gone")

    metrics = WorkerMetrics(broken)
    metrics.requests_total.labels(outcome="ok").inc()
    body, _ = metrics.render()
    assert value(body, "fleetserve_engine_requests_total", outcome="ok") == 1
    assert value(body, "fleetserve_engine_running") is None


def test_worker_metrics_served_over_http_on_port_zero():
    metrics = WorkerMetrics(engine_stats)
    metrics.requests_total.labels(outcome="ok").inc(3)
    server, port = metrics.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read()
    finally:
        metrics.close()
    assert value(body, "fleetserve_engine_running") == 3
    assert value(body, "fleetserve_engine_requests_total", outcome="ok") == 3
    assert value(body, "fleetserve_engine_steps_total") == 1234
