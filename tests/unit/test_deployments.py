"""Deployments against node agents' reports, with an injected clock and no network: placement, scaling, adoption,
lost nodes, and the checks on a deployment's fields."""

from __future__ import annotations

import pytest

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.controller import DeploymentController, Sizing, parse_deployment
from fleetserve.gateway.nodes import CONNECTED, DISCONNECTED, LOST, NodeTable
from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.protocol import fleet_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def sizing(model: str, device: str, memory_mb: int, role: str) -> Sizing:
    if model == "too-big":
        raise InvalidRequestError("max_memory_mb is too small", "max_memory_mb")
    return Sizing(memory_mb or (600 if role == "stage" else 900), 0 if role == "stage" else 400)


def node_info(name: str, memory_mb: int = 4096, cpus: int = 4, slots: int = 4, **labels: str) -> pb.NodeInfo:
    return pb.NodeInfo(name=name, host="127.0.0.1", cpus=cpus, memory_bytes=memory_mb * 2**20, max_workers=slots,
                       labels=labels)  # fmt: skip


@pytest.fixture
def fleet():
    clock = Clock()
    nodes = NodeTable(lost_after_s=10.0, clock=clock)
    registry = WorkerRegistry(1.0, 5.0, clock=clock, connect=lambda address: (None, object()))
    controller = DeploymentController(nodes, registry, sizing)
    nodes.on_change.append(controller.reconcile)  # as the gateway wires them
    return clock, nodes, registry, controller


def report(nodes: NodeTable, node, states: dict[str, str]) -> None:
    """The node reports each planned worker (and any other named) in the given state."""
    workers = []
    for name, state in states.items():
        launch = node.plan.get(name) or pb.WorkerLaunch(name=name, model="m")
        workers.append(pb.NodeWorker(name=name, model=launch.model, role=launch.role, state=state, launch=launch))
    nodes.report(node, pb.NodeReport(info=node.info, workers=workers, plan_version=node.plan_version))


def test_replicas_go_to_the_node_with_the_most_free_memory_and_scale_down_takes_the_idle_first(fleet):
    clock, nodes, registry, controller = fleet
    big = nodes.connect(pb.NodeReport(info=node_info("big", memory_mb=4096)))
    small = nodes.connect(pb.NodeReport(info=node_info("small", memory_mb=2048)))
    controller.set("m", {"replicas": 3})
    assert len(big.plan) == 2 and len(small.plan) == 1  # spread first: big, small, then big (more memory free)
    launches = [*big.plan.values(), *small.plan.values()]
    assert all(w.memory_mb == 900 and w.kv_cache_mb == 400 and w.threads == 1 for w in launches)
    assert len({w.name for w in launches}) == 3 and all(w.name.startswith("m-") for w in launches)
    # Two register and serve; one has requests in flight.
    serving = sorted(big.plan)
    records = [registry.register(pb.WorkerInfo(name=n, address=f"127.0.0.1:{i + 1}", model="m"))
               for i, n in enumerate(serving)]  # fmt: skip
    records[0].in_flight = 3
    version = big.plan_version
    controller.set("m", {"replicas": 1})
    assert list(big.plan) == [serving[0]] and not small.plan  # the unregistered one went first, then the idle one
    assert big.plan_version > version and big.changed.is_set()
    status = controller.to_json()[0]["status"]
    assert status["desired"] == 1 and status["planned"] == 1 and status["serving"] == 1


def test_placement_follows_labels_names_slots_and_cores_and_says_why_it_waits(fleet):
    _, nodes, _, controller = fleet
    nodes.connect(pb.NodeReport(info=node_info("a", slots=1, zone="x")))
    nodes.connect(pb.NodeReport(info=node_info("b", cpus=1, zone="y")))
    controller.set("m", {"replicas": 2, "labels": {"zone": "x"}})
    assert [len(n.plan) for n in nodes.live()] == [1, 0]
    status = controller.to_json()[0]["status"]
    assert status["planned"] == 1 and "free worker slot" in status["waiting"]
    controller.set("n", {"replicas": 1, "threads": 2, "nodes": ["b"]})
    assert "2 core(s)" in controller.to_json()[1]["status"]["waiting"]
    controller.set("o", {"replicas": 1, "labels": {"zone": "z"}})
    assert controller.to_json()[2]["status"]["waiting"] == "no node matches its placement"


def test_a_lost_node_s_workers_are_placed_elsewhere_and_it_gets_its_plan_back_when_it_returns_in_time(fleet):
    clock, nodes, _, controller = fleet
    a = nodes.connect(pb.NodeReport(info=node_info("a", memory_mb=8192)))
    controller.set("m", {"replicas": 1})
    (name,) = a.plan
    nodes.disconnect(a)
    assert a.state == DISCONNECTED
    clock.now += 5
    assert nodes.sweep() == [] and name in a.plan  # within the grace: its plan waits for it
    again = nodes.connect(pb.NodeReport(info=a.info))
    assert again is a and a.state == CONNECTED and a.changed.is_set()
    b = nodes.connect(pb.NodeReport(info=node_info("b", memory_mb=2048)))
    nodes.disconnect(a)
    clock.now += 11
    assert nodes.sweep() == [a] and a.state == LOST and not a.plan
    controller.reconcile()
    assert len(b.plan) == 1 and name not in b.plan


def test_a_returning_node_s_running_workers_are_adopted_and_trimmed_to_the_deployment(fleet):
    _, nodes, _, controller = fleet
    controller.set("m", {"replicas": 1})  # no node yet: it waits
    assert controller.to_json()[0]["status"]["waiting"] == "no node is connected"
    launches = [pb.WorkerLaunch(name=f"m-{i}", model="m", role="replica", device="cpu", threads=1, memory_mb=900)
                for i in range(2)]  # fmt: skip
    workers = [pb.NodeWorker(name=w.name, model="m", role="replica", state="running", launch=w) for w in launches]
    workers.append(pb.NodeWorker(name="m-dead", model="m", state="crash-looping"))
    node = nodes.connect(pb.NodeReport(info=node_info("a"), workers=workers))  # both adopted, then one stopped
    (kept,) = node.plan.values()
    assert kept.name in ("m-0", "m-1") and kept.memory_mb == 900


def test_crash_looping_workers_are_reported_with_their_last_lines_and_dead_records_are_cleaned_up(fleet):
    clock, nodes, registry, controller = fleet
    node = nodes.connect(pb.NodeReport(info=node_info("a")))
    controller.set("m", {"replicas": 1})
    (name,) = node.plan
    old = registry.register(pb.WorkerInfo(name=name, address="127.0.0.1:1", model="m"))
    clock.now += 6
    registry.sweep()
    assert old.state == WorkerState.DEAD
    new = registry.register(pb.WorkerInfo(name=name, address="127.0.0.1:2", model="m"))  # restarted: a new port
    report(nodes, node, {name: "running"})
    controller.reconcile()
    assert old.worker_id not in registry.workers and new.worker_id in registry.workers
    lines = ["Traceback (most recent call last):", "RuntimeError: no CUDA device"]
    launch = node.plan[name]
    crashing = pb.NodeWorker(name=name, model="m", state="crash-looping", last_exit_code=1, last_lines=lines,
                             launch=launch)  # fmt: skip
    nodes.report(node, pb.NodeReport(info=node.info, workers=[crashing], plan_version=node.plan_version))
    (looping,) = controller.to_json()[0]["status"]["crash_looping"]
    assert looping == {"worker": name, "node": "a", "exit_code": 1, "last_lines": lines}


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"replicas": -1}, "replicas"),
        ({"replicas": "2"}, "replicas"),
        ({"role": "head"}, "role"),
        ({"device": "tpu"}, "device"),
        ({"threads": 0}, "threads"),
        ({"colour": "red"}, "deployment.colour"),
        ({"replicas": 3, "max_replicas": 2}, "replicas"),
        ({"min_replicas": 2, "max_replicas": 1}, "min_replicas"),
        ({"nodes": "a"}, "nodes"),
        ({"labels": {"zone": 1}}, "labels"),
    ],
)
def test_a_bad_deployment_is_refused_naming_the_key(body, key):
    with pytest.raises(InvalidRequestError) as info:
        parse_deployment("m", body)
    assert info.value.param == key


def test_bounds_follow_replicas_unless_given_and_a_model_that_cannot_be_sized_is_refused(fleet):
    _, _, _, controller = fleet
    d = controller.set("m", {"replicas": 3})
    assert (d.min_replicas, d.replicas, d.max_replicas) == (0, 3, 3)
    d = controller.set("m", {"replicas": 5})
    assert d.max_replicas == 5
    d = controller.set("m", {"min_replicas": 1, "max_replicas": 8, "replicas": 2})
    assert (d.min_replicas, d.replicas, d.max_replicas) == (1, 2, 8)
    with pytest.raises(InvalidRequestError):
        controller.set("too-big", {"replicas": 1})
    assert ("too-big", "replica") not in controller.deployments
    assert controller.remove("m").model == "m" and controller.remove("m") is None


def test_a_changed_deployment_replaces_its_workers_one_at_a_time_while_they_serve(fleet):
    _, nodes, registry, controller = fleet
    node = nodes.connect(pb.NodeReport(info=node_info("a")))
    controller.set("m", {"replicas": 2})
    old = sorted(node.plan)
    for i, name in enumerate(old):
        registry.register(pb.WorkerInfo(name=name, address=f"127.0.0.1:{i + 1}", model="m"))
    controller.set("m", {"threads": 2})
    assert len(node.plan) == 2 and len(set(node.plan) & set(old)) == 1  # one replaced, one still serving
    assert all(w.threads == 2 for name, w in node.plan.items() if name not in old)
    controller.reconcile()
    assert len(set(node.plan) & set(old)) == 1  # its replacement does not serve yet: the other waits
    new = next(name for name in node.plan if name not in old)
    registry.register(pb.WorkerInfo(name=new, address="127.0.0.1:9", model="m"))
    controller.reconcile()
    assert not set(node.plan) & set(old) and all(w.threads == 2 for w in node.plan.values())


def test_the_model_config_s_deployments_are_the_gateway_s_at_start():
    from fleetserve.gateway.main import _deployments
    from fleetserve.gateway.models import ModelRegistry
    from fleetserve.settings.gateway import GatewaySettings

    models = ModelRegistry.from_config(
        {
            "m": {"deployment": {"replicas": 2, "memory_mb": 1200}},
            "pd": {
                "deployment": [
                    {"role": "prefill", "replicas": 1, "memory_mb": 1200},
                    {"role": "decode", "replicas": 2, "memory_mb": 1200},
                ]
            },
        }  # fmt: skip
    )
    registry = WorkerRegistry(1.0, 5.0, connect=lambda address: (None, object()))
    controller = _deployments(GatewaySettings(), models, registry, None)
    shapes = {key: (d.replicas, d.memory_mb) for key, d in controller.deployments.items()}
    assert shapes == {("m", "replica"): (2, 1200), ("pd", "prefill"): (1, 1200), ("pd", "decode"): (2, 1200)}
    with pytest.raises(ValueError, match="deployment"):
        ModelRegistry.from_config({"m": {"deployment": "two"}})
    with pytest.raises(InvalidRequestError):
        _deployments(
            GatewaySettings(), ModelRegistry.from_config({"m": {"deployment": {"replicas": -1}}}), registry, None
        )


def test_a_pipeline_s_stage_nodes_are_a_deployment_too_and_a_node_starts_them_with_their_cap(fleet, tmp_path):
    from fleetserve.settings.node import NodeSettings
    from fleetserve.worker.node import NodeAgent

    _, nodes, _, controller = fleet
    node = nodes.connect(pb.NodeReport(info=node_info("a")))
    nodes.connect(pb.NodeReport(info=node_info("b")))
    controller.set("m", {"role": "stage", "replicas": 2})
    stages = [launch for _, launch in nodes.placed()]
    assert [(w.role, w.memory_mb, w.kv_cache_mb) for w in stages] == [("stage", 600, 0)] * 2
    assert len(node.plan) == 1  # one stage node per machine while they have room
    agent = NodeAgent(NodeSettings(gateway="127.0.0.1:1", log_dir=str(tmp_path)))
    argv = agent.spec(stages[0]).argv
    assert argv[argv.index("--role") + 1] == "stage" and argv[argv.index("--max-memory-mb") + 1] == "600"
    assert "--kv-cache-mb" not in argv
