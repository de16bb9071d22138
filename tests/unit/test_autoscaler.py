"""The autoscaler against a real controller, registry and metrics, with an injected clock and no network: scaling up
on queue depth, KV use and TTFT p90, hysteresis and cooldowns, idle to min, and its settings' checks."""

from __future__ import annotations

import pytest

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.autoscaler import AutoscalePolicy, Autoscaler, TtftWindow
from fleetserve.gateway.controller import DeploymentController, Sizing
from fleetserve.gateway.nodes import NodeTable
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.telemetry.metrics import GatewayMetrics


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Queue:
    """The admission queue's length per model, as the test sets it."""

    def __init__(self):
        self.lengths: dict[str, int] = {}

    def queued(self, model: str) -> int:
        return self.lengths.get(model, 0)


POLICY = {"queue_per_replica": 2, "kv_usage": 0.8, "ttft_p90_s": 1.0, "window_s": 10, "up_after_s": 3,
          "down_after_s": 20, "idle_after_s": 60, "up_cooldown_s": 5, "down_cooldown_s": 10}  # fmt: skip


@pytest.fixture
def scaled():
    clock = Clock()
    nodes = NodeTable(clock=clock)
    registry = WorkerRegistry(1.0, 5.0, clock=clock, connect=lambda address: (None, object()))
    controller = DeploymentController(nodes, registry, lambda model, device, memory, role: Sizing(500, 100))
    nodes.on_change.append(controller.reconcile)
    nodes.connect(pb.NodeReport(info=pb.NodeInfo(name="a", host="h", cpus=8, memory_bytes=8 * 2**30, max_workers=8)))
    queue, metrics = Queue(), GatewayMetrics()
    autoscaler = Autoscaler(controller, queue, metrics, clock)
    controller.autoscaler = autoscaler
    controller.set("m", {"replicas": 1, "min_replicas": 1, "max_replicas": 3, "autoscale": POLICY})
    return clock, registry, controller, queue, metrics, autoscaler


def serve_all(registry: WorkerRegistry, controller: DeploymentController, **stats) -> list:
    """Register every planned worker that is not registered yet (it loaded), with these engine stats."""
    records = []
    for i, (_, launch) in enumerate(controller.nodes.placed()):
        record = next((r for r in registry.workers.values() if r.name == launch.name), None)
        if record is None:
            record = registry.register(pb.WorkerInfo(name=launch.name, address=f"127.0.0.1:{i + 1}", model="m",
                                                     kv_blocks_total=100))  # fmt: skip
        record.stats = pb.WorkerStats(kv_blocks_total=100, **stats)
        records.append(record)
    controller.reconcile()
    return records


def run(clock: Clock, autoscaler: Autoscaler, seconds: int) -> list[dict]:
    decisions = []
    for _ in range(seconds):
        clock.now += 1
        decisions += autoscaler.tick()
    return decisions


def test_a_queue_that_stays_deep_adds_workers_one_loaded_at_a_time_up_to_the_max(scaled):
    clock, registry, controller, queue, metrics, autoscaler = scaled
    serve_all(registry, controller)
    queue.lengths["m"] = 5
    assert run(clock, autoscaler, 2) == []  # not for long enough yet
    (up,) = run(clock, autoscaler, 2)
    assert (up["from"], up["to"], up["direction"]) == (1, 2, "up") and "queue 5.0 per worker > 2" in up["reason"]
    assert controller.deployments["m", "replica"].replicas == 2 and len(controller.nodes.placed()) == 2
    assert run(clock, autoscaler, 30) == []  # the new worker has not loaded: no third one yet
    serve_all(registry, controller)
    (up,) = run(clock, autoscaler, 5)
    assert up["to"] == 3
    serve_all(registry, controller)
    assert run(clock, autoscaler, 30) == []  # at the max
    assert metrics.autoscale_decisions_total.labels(model="m", direction="up")._value.get() == 2
    assert [d["to"] for d in controller.to_json()[0]["autoscaling"]["decisions"]] == [2, 3]


def test_kv_use_and_ttft_scale_up_and_the_hysteresis_keeps_it_from_flapping(scaled):
    clock, registry, controller, queue, metrics, autoscaler = scaled
    serve_all(registry, controller, kv_blocks_used=90)
    (up,) = run(clock, autoscaler, 4)
    assert "KV use 90% > 80%" in up["reason"]
    for record in serve_all(registry, controller, kv_blocks_used=60):  # under the threshold, not under half of it
        record.in_flight = 1  # busy, not idle: the idle rule does not apply
    assert run(clock, autoscaler, 70) == []
    serve_all(registry, controller, kv_blocks_used=10)
    (down,) = run(clock, autoscaler, 21)
    assert (down["from"], down["to"]) == (2, 1) and "under half" in down["reason"]
    histogram = metrics.time_to_first_token_seconds.labels(model="m")
    for _ in range(10):
        histogram.observe(3.0)
    (up,) = [d for d in run(clock, autoscaler, 12) if d["direction"] == "up"]
    assert "TTFT p90" in up["reason"] and up["signals"]["ttft_p90_s"] > 1.0


def test_no_requests_for_the_idle_time_goes_straight_to_the_minimum(scaled):
    clock, registry, controller, queue, metrics, autoscaler = scaled
    controller.set("m", {"replicas": 3, "autoscale": {**POLICY, "idle_after_s": 15}})
    serve_all(registry, controller)
    assert run(clock, autoscaler, 14) == []
    (decision,) = run(clock, autoscaler, 30)
    assert (decision["from"], decision["to"]) == (3, 1) and decision["reason"] == "no requests for 15s"
    assert controller.deployments["m", "replica"].replicas == 1 and len(controller.nodes.placed()) == 1


def test_ttft_window_forgets_what_is_older_than_the_window():
    clock = Clock()
    metrics = GatewayMetrics()
    window = TtftWindow(metrics.time_to_first_token_seconds, clock)
    assert window.p90("m", 10) is None
    hist = metrics.time_to_first_token_seconds.labels(model="m")
    for _ in range(20):
        hist.observe(0.2)
    assert window.p90("m", 10) <= 0.25
    clock.now += 11
    window.p90("m", 10)
    clock.now += 1
    for _ in range(20):
        hist.observe(4.0)
    assert window.p90("m", 10) >= 4.0


@pytest.mark.parametrize("value", [{"queue_per_replica": 0}, {"kv_usage": 1.5}, {"up_after_s": -1},
                                   {"speed": 1}, {"up_after_s": "soon"}, "yes"])  # fmt: skip
def test_bad_autoscale_settings_are_refused(value):
    with pytest.raises(InvalidRequestError):
        AutoscalePolicy.parse(value)
    assert AutoscalePolicy.parse(True) == AutoscalePolicy()
