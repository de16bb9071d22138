"""The pipeline controller against a real worker registry, with stage nodes that answer assignments and probes in
memory: admission of stage nodes, plans applied, shortfalls, losses, the cooldown, failed assignments, stage
faults, what routing sees, and the gateway's views of it (/ready, /v1/models, /admin/pipelines, nodes list)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.gateway.admission import Admission
from fleetserve.gateway.app import create_app
from fleetserve.gateway.control import _stage_news
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.model_policies import ModelPolicies
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.pipelines import PipelineController
from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.gateway.state import GatewayState
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.nodes_cli import format_pipelines
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.telemetry.metrics import GatewayMetrics

MiB = 1 << 20
MODEL = "smollm2-135m"
# SmolLM2-135M in float32: a layer is 13.5 MiB, its KV for 2,048 tokens 3 MiB, the (tied) embeddings 108 MiB.
LAYERS, LAYER_BYTES, EMBED_BYTES, KV_PER_TOKEN, CONTEXT, BLOCK = 30, 14_155_776, 113_246_208, 1536, 2048, 16


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def no_network(address):
    return None, object()


def stage_info(name: str, mb: int, port: int, **changes) -> pb.WorkerInfo:
    profile = pb.StageProfile(
        layer_bytes=LAYER_BYTES,
        embed_bytes=EMBED_BYTES,
        lm_head_bytes=0,
        lm_head_read_bytes=EMBED_BYTES,
        kv_bytes_per_token=KV_PER_TOKEN,
        layer_seconds=changes.pop("layer_seconds", 0.001),
        weights_fingerprint=changes.pop("weights_fingerprint", "f" * 64),
    )
    fields = dict(name=name, address=f"127.0.0.1:{port}", model=MODEL, role="stage", memory_cap_bytes=mb * MiB)
    fields.update(max_model_len=CONTEXT, block_size=BLOCK, num_layers=LAYERS, architecture="llama", dtype="float32")
    fields.update(changes)
    info = pb.WorkerInfo(**fields)
    info.stage.CopyFrom(profile)
    return info


class Stages:
    """A real registry and a controller whose stage nodes answer in memory, the way a stage worker would."""

    def __init__(self, cooldown_s: float = 10.0, metrics: GatewayMetrics | None = None) -> None:
        self.clock = Clock()
        self.registry = WorkerRegistry(1.0, 5.0, clock=self.clock, connect=no_network)
        self.calls: list[tuple[str, pb.StageAssignment]] = []
        self.refuse: dict[str, str] = {}
        self.unreachable: set[str] = set()
        self.controller = PipelineController(
            self.registry, cooldown_s, assign=self.assign, probe=self.probe, clock=self.clock, metrics=metrics
        )
        self._ports = iter(range(9000, 9100))

    async def assign(self, record, a: pb.StageAssignment) -> pb.StageStatus:
        self.calls.append((record.name, a))
        if record.name in self.refuse:
            return pb.StageStatus(ok=False, detail=self.refuse[record.name])
        if a.release:
            return pb.StageStatus(ok=True)
        layers = a.layer_end - a.layer_start
        weights = layers * LAYER_BYTES + (EMBED_BYTES if a.layer_start == 0 else 0)
        fits = (record.info.memory_cap_bytes - weights) // (BLOCK * layers * KV_PER_TOKEN)
        return pb.StageStatus(
            ok=True, kv_blocks=a.kv_blocks or fits, layer_start=a.layer_start, layer_end=a.layer_end, max_model_len=2048
        )

    async def probe(self, record) -> bool:
        return record.name not in self.unreachable

    async def join(self, name: str, mb: int, **changes):
        """Register a stage node the way the gateway's on_register does: admit, then re-plan."""
        record = self.registry.register(stage_info(name, mb, next(self._ports), **changes))
        try:
            await self.controller.admit(record)
        except ValueError:
            self.registry.remove(record.worker_id)
            raise
        self.controller.replan(MODEL, f"{name} joined")
        await self.controller.settle()
        return record

    @property
    def state(self):
        return self.controller.pipelines[MODEL]

    def stages(self) -> list[tuple[str, int, int]]:
        return [(s["name"], s["layer_start"], s["layer_end"]) for s in self.controller.to_json(MODEL)["stages"]]


def run(scenario):
    return asyncio.run(scenario())


def covers_every_layer_once(stages: list[tuple[str, int, int]]) -> bool:
    return [s[1] for s in stages] == [0] + [s[2] for s in stages[:-1]] and stages[-1][2] == LAYERS


def test_a_plan_is_applied_when_the_nodes_hold_the_model():
    async def scenario():
        fleet = Stages()
        a = await fleet.join("a", 300)
        assert not fleet.state.serving and fleet.registry.routable(MODEL) == []  # a stage is never routable alone
        b = await fleet.join("b", 400)
        stages = fleet.stages()
        assert fleet.state.serving and covers_every_layer_once(stages) and {s[0] for s in stages} == {"a", "b"}
        head = fleet.registry.workers[fleet.state.head_id]
        other = b if head is a else a
        assert fleet.registry.routable(MODEL) == [head] and head.serving and not other.serving
        # The other stage first, then the head with the pipeline's KV blocks and the route down the chain.
        (first, to_other), (last, to_head) = fleet.calls
        assert (first, last) == (other.name, head.name) and to_other.kv_blocks == 0 and not to_other.downstream
        assert [r.name for r in to_head.downstream] == [other.name] and to_head.depth == 2
        assert to_head.downstream[0].address == other.info.address and to_head.weights_fingerprint == "f" * 64
        assert 0 < to_head.kv_blocks <= fleet.state.plan.kv_blocks
        assert head.info.kv_blocks_total == to_head.kv_blocks and head.info.max_model_len == 2048
        for name, start, end in stages:
            record = a if name == "a" else b
            assert (record.info.layer_start, record.info.layer_end) == (start, end)
        assert fleet.state.repartitions == 1 and fleet.state.status.startswith("serving: ")

    run(scenario)


def test_a_shortfall_says_what_is_missing_until_a_node_joins():
    async def scenario():
        fleet = Stages()
        await fleet.join("a", 300)
        await fleet.join("b", 300)  # 11 layers on a head, 18 on the other: one short
        status = fleet.controller.status(MODEL)
        assert status == "waiting for capacity: 499 of 513 MiB placed; add a stage node with at least 17 MiB"
        assert not fleet.controller.serving(MODEL) and fleet.calls == []
        await fleet.join("c", 200)
        assert fleet.controller.serving(MODEL) and covers_every_layer_once(fleet.stages())

    run(scenario)


def test_a_member_that_dies_is_planned_around_at_once():
    async def scenario():
        fleet = Stages(cooldown_s=0.0)  # each join may re-partition at once
        nodes = {name: await fleet.join(name, 400) for name in "abc"}
        assert len(fleet.stages()) == 3  # equal nodes: three stages beat two
        head = fleet.registry.workers[fleet.state.head_id]
        last = nodes[fleet.stages()[-1][0]]
        fleet.registry.mark_dead(last, "no heartbeat")
        assert not head.serving and fleet.registry.routable(MODEL) == []  # no requests into a broken chain
        await fleet.controller.settle()
        stages = fleet.stages()
        assert len(stages) == 2 and last.name not in {s[0] for s in stages} and covers_every_layer_once(stages)
        for name, start, end in stages:
            assert (nodes[name].info.layer_start, nodes[name].info.layer_end) == (start, end)
        now_head = fleet.registry.workers[fleet.state.head_id]
        assert now_head.serving and fleet.registry.routable(MODEL) == [now_head]
        # Losing the head: another node heads the pipeline, the old head is neither serving nor routable.
        fleet.registry.remove(now_head.worker_id)
        await fleet.controller.settle()
        assert fleet.controller.status(MODEL).startswith("waiting for capacity: ")  # one 400 MiB node is short
        assert fleet.registry.routable(MODEL) == [] and not now_head.serving
        assert fleet.state.events[-1][1].startswith("stopped serving")

    run(scenario)


def test_the_head_moves_when_it_leaves_and_the_rest_suffice():
    async def scenario():
        fleet = Stages(cooldown_s=0.0)  # each join may re-partition at once
        for name in "abc":
            await fleet.join(name, 400)
        old_head = fleet.registry.workers[fleet.state.head_id]
        fleet.registry.remove(old_head.worker_id)
        await fleet.controller.settle()
        new_head = fleet.registry.workers[fleet.state.head_id]
        assert new_head is not old_head and new_head.serving and not old_head.serving
        assert fleet.registry.routable(MODEL) == [new_head] and covers_every_layer_once(fleet.stages())

    run(scenario)


def test_the_cooldown_holds_back_improvements_but_not_losses():
    async def scenario():
        fleet = Stages(cooldown_s=10.0)
        await fleet.join("a", 620)  # holds the whole model alone
        assert fleet.stages() == [("a", 0, 30)]
        b = await fleet.join("b", 400)  # two stages would be faster, but the plan just changed
        assert fleet.stages() == [("a", 0, 30)] and fleet.state.retry is not None and fleet.state.repartitions == 1
        fleet.clock.now += 11
        await fleet.controller.replan(MODEL, "cooldown over")
        assert len(fleet.stages()) == 2 and fleet.state.repartitions == 2
        fleet.registry.mark_dead(b, "no heartbeat")  # a loss right after a change: no waiting
        await fleet.controller.settle()
        assert fleet.stages() == [("a", 0, 30)] and fleet.state.repartitions == 3
        await fleet.controller.close()

    run(scenario)


def test_an_old_member_left_out_of_a_new_plan_is_released():
    async def scenario():
        fleet = Stages(cooldown_s=0.0)
        slow = await fleet.join("slow", 620, layer_seconds=1.0)
        assert fleet.stages() == [("slow", 0, 30)] and slow.serving
        fast = await fleet.join("fast", 620)  # alone it beats any plan that gives the slow node a layer
        assert fleet.stages() == [("fast", 0, 30)] and fast.serving and fleet.registry.routable(MODEL) == [fast]
        assert [(name, a.model) for name, a in fleet.calls if a.release] == [("slow", MODEL)]
        assert (slow.info.layer_start, slow.info.layer_end) == (0, 0) and not slow.serving

    run(scenario)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"weights_fingerprint": "0" * 64}, "weights_fingerprint"),
        ({"num_layers": 24}, "num_layers 24"),
        ({"dtype": "bfloat16"}, "dtype 'bfloat16'"),
        ({"memory_cap_bytes": 10 * MiB}, "offers 10 MiB; a stage of this model needs at least 17 MiB"),
    ],
)
def test_admit_refuses_a_node_that_cannot_join_with_the_reason(changes, words):
    async def scenario():
        fleet = Stages()
        await fleet.join("a", 300)
        with pytest.raises(ValueError, match=words):
            await fleet.join("odd", 300, **changes)
        assert [r.name for r in fleet.controller.live(MODEL)] == ["a"]

    run(scenario)


def test_admit_refuses_a_node_without_its_profile():
    async def scenario():
        fleet = Stages()
        record = fleet.registry.register(pb.WorkerInfo(name="bare", address="127.0.0.1:1", model=MODEL, role="stage"))
        with pytest.raises(ValueError, match="stage profile"):
            await fleet.controller.admit(record)

    run(scenario)


def test_a_failed_assignment_leaves_no_serving_head_and_is_retried():
    async def scenario():
        fleet = Stages()
        fleet.refuse["b"] = "out of memory"
        await fleet.join("a", 300)
        await fleet.join("b", 400)
        status = fleet.controller.status(MODEL)
        assert status.startswith("re-partition failed: b refused [") and status.endswith("out of memory")
        assert not fleet.controller.serving(MODEL) and fleet.registry.routable(MODEL) == []
        assert fleet.state.retry is not None and fleet.state.events[-1][1] == status
        del fleet.refuse["b"]
        await fleet.controller.replan(MODEL, "retry")
        assert fleet.controller.serving(MODEL) and len(fleet.registry.routable(MODEL)) == 1
        await fleet.controller.close()

    run(scenario)


def test_a_stage_fault_marks_the_silent_member_dead_and_replans():
    async def scenario():
        fleet = Stages(cooldown_s=0.0)  # each join may re-partition at once
        nodes = {name: await fleet.join(name, 400) for name in "abc"}
        head = fleet.registry.workers[fleet.state.head_id]
        silent = nodes[fleet.stages()[1][0]]
        fleet.unreachable.add(silent.name)
        fault = pb.HeartbeatReport(worker_id=head.worker_id, stage_fault=f"{silent.name}: connection reset")
        fleet.controller.on_stage_report(head, fault)
        fleet.controller.on_stage_report(head, fault)  # repeated while it is looked into: one check
        await fleet.controller.settle()
        assert silent.state == WorkerState.DEAD and silent.name not in {s[0] for s in fleet.stages()}
        assert fleet.controller.serving(MODEL) and any("stage fault" in text for _, text in fleet.state.events)

    run(scenario)


def test_a_stage_fault_with_every_member_answering_rebuilds_the_chain():
    async def scenario():
        fleet = Stages()
        for name in "ab":
            await fleet.join(name, 400)
        head = fleet.registry.workers[fleet.state.head_id]
        before, calls = fleet.stages(), len(fleet.calls)
        await fleet.controller.on_stage_fault(head, "stream closed")
        assert fleet.stages() == before and len(fleet.calls) == calls + 2 and fleet.state.repartitions == 2
        assert head.serving

    run(scenario)


def test_a_draining_member_leaves_the_pipeline_and_reports_feed_the_metrics():
    async def scenario():
        metrics = GatewayMetrics()
        fleet = Stages(cooldown_s=0.0, metrics=metrics)
        nodes = {name: await fleet.join(name, 400) for name in "abc"}
        head = fleet.registry.workers[fleet.state.head_id]
        hops = [pb.StageHop(name=n, compute_s=0.004, transfer_s=0.001, layer_end=30) for n, _, _ in fleet.stages()]
        report = pb.HeartbeatReport(
            worker_id=head.worker_id, pipeline=pb.PipelineReport(stages=3, depth=3, bubble=0.25, hops=hops)
        )
        assert _stage_news(head, report)
        fleet.controller.on_stage_report(head, report)
        view = fleet.controller.to_json(MODEL)
        assert (
            view["bubble"] == 0.25
            and view["depth"] == 3
            and [h["name"] for h in view["hops"]] == [n for n, _, _ in fleet.stages()]
        )
        body = metrics.render()[0].decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("fleetserve_pipeline_bubble", (("model", MODEL),))] == 0.25
        assert samples[("fleetserve_pipeline_repartitions_total", (("model", MODEL),))] == 2 == fleet.state.repartitions
        second = hops[1].name
        key = ("fleetserve_pipeline_link_transfer_seconds_count", (("model", MODEL), ("stage", second)))
        assert samples[key] == 1
        links = {fleet.registry.workers[w].name: s for w, s in fleet.controller.link_s.items()}
        assert links[second] == links[hops[2].name] == 0.001  # the pipeline's own timing replaces the probe's
        assert links[hops[0].name] != 0.001  # the head has no link into it: the gateway's view stays
        fleet.controller.on_stage_report(head, report)  # the same step again (an idle head): not counted twice
        body = metrics.render()[0].decode()
        assert f'fleetserve_pipeline_link_transfer_seconds_count{{model="{MODEL}",stage="{second}"}} 1.0' in body
        draining = nodes[fleet.stages()[-1][0]]
        fleet.registry.heartbeat(pb.HeartbeatReport(worker_id=draining.worker_id, draining=True))
        news = pb.HeartbeatReport(worker_id=draining.worker_id, draining=True)
        assert _stage_news(draining, news)
        fleet.controller.on_stage_report(draining, news)
        await fleet.controller.settle()
        assert draining.name not in {s[0] for s in fleet.stages()} and fleet.controller.serving(MODEL)

    run(scenario)


def test_replicas_stay_routable_and_stage_records_never_are_until_they_head():
    async def scenario():
        fleet = Stages()
        replica = fleet.registry.register(pb.WorkerInfo(name="r", address="127.0.0.1:1", model=MODEL))
        stage = await fleet.join("a", 300)
        assert replica.routable and not stage.routable and fleet.registry.routable(MODEL) == [replica]

    run(scenario)


def make_state(fleet: Stages) -> GatewayState:
    models = ModelRegistry()
    for record in fleet.registry.workers.values():
        models.learn(record.info)
    policies = ModelPolicies(models)
    admission = Admission(fleet.registry, policies.policy)
    return GatewayState(
        registry=fleet.registry,
        tokenizers=TokenizerStore(),
        dispatcher=Dispatcher(fleet.registry, policies, admission),
        settings=GatewaySettings(),
        models=models,
        pipelines=fleet.controller,
    )


def test_ready_models_and_admin_show_a_waiting_pipeline():
    async def setup():
        fleet = Stages()
        await fleet.join("a", 300)
        await fleet.join("b", 300)
        return fleet

    fleet = run(setup)
    client = TestClient(create_app(make_state(fleet)), raise_server_exceptions=False)
    ready = client.get("/ready")
    assert ready.status_code == 503
    entry = ready.json()["models"][MODEL]
    assert entry["healthy_workers"] == 0 and entry["pipeline"].startswith("waiting for capacity: ")
    model = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == MODEL)
    assert model["fleetserve"]["healthy_workers"] == 0 and model["fleetserve"]["pipeline"]["serving"] is False
    pipelines = client.get("/admin/pipelines").json()["pipelines"]
    assert [p["model"] for p in pipelines] == [MODEL] and pipelines[0]["stages"] == []
    workers = client.get("/admin/workers").json()["workers"]
    assert {(w["role"], w["layer_start"], w["layer_end"], w["serving"]) for w in workers} == {("stage", 0, 0, False)}
    assert format_pipelines(pipelines) == f"pipeline {MODEL}: {pipelines[0]['status']}"


def test_nodes_list_shows_a_serving_pipeline_with_its_ranges():
    async def setup():
        fleet = Stages()
        await fleet.join("a", 300)
        await fleet.join("b", 400)
        return fleet

    fleet = run(setup)
    line = format_pipelines([fleet.controller.to_json(MODEL)])
    assert line.startswith(f"pipeline {MODEL}: serving: ") and "[0, " in line and "re-partitions: 1" in line


def test_a_models_own_pipeline_settings_come_from_the_model_config():
    from fleetserve.gateway.models import ModelRegistry
    from fleetserve.gateway.pipelines import PipelineController
    from fleetserve.gateway.registry import WorkerRegistry

    models = ModelRegistry.from_config({"m": {"pipeline": {"depth": 4, "cooldown": 2.5}}, "n": {}})
    controller = PipelineController(WorkerRegistry(connect=lambda address: (None, None)), cooldown_s=10.0, depth=0)
    controller.overrides = lambda model: models.get(model).pipeline
    assert (controller.depth_of("m"), controller.cooldown("m")) == (4, 2.5)
    assert (controller.depth_of("n"), controller.cooldown("n")) == (0, 10.0)
    for bad in ({"depth": -1}, {"depth": 1.5}, {"stages": 2}, {"cooldown": "soon"}):
        with pytest.raises(ValueError, match="pipeline"):
            ModelRegistry.from_config({"m": {"pipeline": bad}})


def test_link_latency_is_measured_on_admission_and_weighs_in_the_plan():
    async def scenario():
        fleet = Stages()
        answer = fleet.probe

        async def slow_for_c(record) -> bool:
            if record.name == "c":
                await asyncio.sleep(0.02)  # a 20 ms round trip
            return await answer(record)

        fleet.controller.probe = slow_for_c
        for name in ("a", "b", "c"):
            await fleet.join(name, 400)
        links = {fleet.registry.workers[w].name: s for w, s in fleet.controller.link_s.items()}
        assert links["c"] >= 0.01 and links["a"] < 0.005 and links["b"] < 0.005
        ranges = {name: end - start for name, start, end in fleet.stages()}
        assert ranges.get("c", 0) < max(ranges.get("a", 0), ranges.get("b", 0))  # the far node gets fewer layers

    run(scenario)
