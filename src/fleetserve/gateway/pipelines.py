"""Pipelines of stage nodes: for each model served by ``--role stage`` workers, which of them hold which layers.

A stage node registers without a layer range and with its offer (:class:`~fleetserve.protocol.fleet_pb2.
StageProfile`). :meth:`PipelineController.admit` refuses one that disagrees with the model's other live stage nodes
(weights, layer count, architecture, dtype, block size) or that could never hold a stage. The controller then
re-plans the model (``partitioner.partition`` over its live stage nodes) whenever a stage node joins, when a member
of its pipeline dies, deregisters or drains, and when the pipeline's head reports that its chain broke. Re-plans of
one model run one at a time.

A new plan is applied at once when there is none or the current one lost a member; a plan that is only faster
(``partitioner.better``) waits until ``cooldown_s`` has passed since the last change. Applying a plan assigns every
non-head stage its range, the last first, then the head, with the pipeline's KV blocks (the least any stage holds)
and the route down the chain; old members left out are released. Only then does the head become routable
(``WorkerRecord.serving``); no other stage record ever is, so requests go to heads only. A failed assignment leaves
the model without a serving pipeline and is tried again after the cooldown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc

from fleetserve.gateway.partitioner import PipelinePlan, Shortfall, StageNode, below_minimum, better, partition
from fleetserve.gateway.pipeline_state import WAITING, PipelineState, model_size, stage_identity
from fleetserve.gateway.registry import STAGE_ROLE, WorkerRecord, WorkerRegistry, WorkerState
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.telemetry.metrics import DisabledGatewayMetrics, GatewayMetrics

log = logging.getLogger(__name__)

ASSIGN_TIMEOUT_S = 120.0
"""How long a stage may take to answer an assignment (it loads its layers before it answers)."""
PROBE_TIMEOUT_S = 1.0
LINK_WEIGHT = 0.2
"""Weight of each new step's measured transfer time in a stage's running link latency."""

Assign = Callable[[WorkerRecord, pb.StageAssignment], Awaitable[pb.StageStatus]]
"""Sends one assignment to a stage node and returns its answer (the gateway's: the Stage service's Assign)."""
Probe = Callable[[WorkerRecord], Awaitable[bool]]
"""Whether a stage node answers at all (the gateway's: Worker.Health without a generation)."""

_CALL_ERRORS = (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)


class AssignFailed(Exception):
    """A stage refused its assignment or did not answer: the plan cannot be applied."""


class PipelineController:
    """Keeps every stage-served model's pipeline planned and assigned; one per gateway.

    It listens to the registry's ``on_dead`` itself. The gateway awaits :meth:`admit` when a stage node registers
    (ValueError refuses it), then calls :meth:`replan`, and hands it the heartbeats of stage nodes that carry a
    pipeline report, a stage fault or draining (:meth:`on_stage_report`). ``on_change`` listeners hear the model's
    name whenever its serving head changed (the admission queue can move then).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        cooldown_s: float = 10.0,
        depth: int = 0,
        *,
        assign: Assign | None = None,
        probe: Probe | None = None,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        assign_timeout_s: float = ASSIGN_TIMEOUT_S,
    ):
        self.registry = registry
        self.cooldown_s = cooldown_s
        """Seconds between re-partitions that only make a working pipeline faster."""
        self.depth = depth
        self.overrides: Callable[[str], dict[str, Any]] = lambda model: {}
        """A model's own pipeline settings (``depth``, ``cooldown``) over the gateway's (its model config)."""
        """Micro-batches in flight per pipeline; 0: one per stage."""
        self.assign = assign or self._grpc_assign
        self.probe = probe or self._grpc_probe
        self.metrics = metrics if metrics is not None else DisabledGatewayMetrics()
        self.clock = clock
        self.assign_timeout_s = assign_timeout_s
        self.applying: set[str] = set()
        """Models whose new plan is being assigned right now: their next head is on its way."""
        self.on_change: list[Callable[[str], None]] = []
        self.pipelines: dict[str, PipelineState] = {}
        self._admitted: dict[str, WorkerRecord] = {}
        self.link_s: dict[str, float] = {}
        """Each admitted stage node's link latency: half the shortest of a few round trips from the gateway on
        admission, then the running mean of the transfer times into it that the head reports."""
        self._links_timed: set[str] = set()
        """Stage nodes whose link_s the pipeline's own steps have timed (the admission probe's value is gone)."""
        self._order: dict[str, int] = {}
        self._counter = itertools.count()
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        registry.on_dead.append(self.on_dead)

    # -- stage nodes come and go --------------------------------------------------------------------------

    async def admit(self, record: WorkerRecord) -> None:
        """Accept a registering stage node, or refuse it (ValueError, with the reason): no stage profile, a
        disagreement with the model's other live stage nodes, or too little memory for even one layer."""
        info = record.info
        if not info.HasField("stage"):
            raise ValueError(f"stage node {info.name} registered without its stage profile")
        others = [r for r in self.live(info.model) if r is not record]
        if others:
            mine, theirs = stage_identity(info), stage_identity(others[0].info)
            for key, value in mine.items():
                if value != theirs[key]:
                    raise ValueError(
                        f"stage node {info.name} has {key} {value!r}, but stage node {others[0].name} of "
                        f"{info.model} has {theirs[key]!r}: every stage node of a model must load the same model"
                    )
        try:
            reason = below_minimum(model_size(info), self._node(record, 0))
        except ValueError as exc:
            raise ValueError(f"stage node {info.name}: {exc}") from None
        if reason is not None:
            raise ValueError(reason)
        self.link_s[record.worker_id] = await self._link_latency(record)
        self._order.setdefault(record.worker_id, next(self._counter))
        self._admitted[record.worker_id] = record
        self._draining.discard(record.worker_id)
        self.pipelines.setdefault(info.model, PipelineState(info.model))

    def on_dead(self, record: WorkerRecord) -> None:
        """The registry gave up on a worker (dead, deregistered or replaced): re-plan its model if it was a stage."""
        if self._admitted.get(record.worker_id) is not record:
            return
        del self._admitted[record.worker_id]
        self._draining.discard(record.worker_id)
        self._lose(record, f"{record.name} left")

    def on_stage_report(self, record: WorkerRecord, report: pb.HeartbeatReport) -> None:
        """A stage node's heartbeat: draining leaves the pipeline, a head's report is kept (and measured), a head's
        stage fault is looked into."""
        if self._admitted.get(record.worker_id) is not record:
            return
        state = self.pipelines[record.info.model]
        if report.draining and record.worker_id not in self._draining:
            self._draining.add(record.worker_id)
            self._lose(record, f"{record.name} is draining")
        is_head = bool(state.members) and state.members[0] is record
        if is_head and report.HasField("pipeline"):
            previous, state.report = state.report, pb.PipelineReport()
            state.report.CopyFrom(report.pipeline)
            self._observe(state, report.pipeline, previous)
        if is_head and report.stage_fault and not state.fault_pending:
            state.fault_pending = True  # heartbeats keep coming while the fault is looked into
            self._spawn(self.on_stage_fault(record, report.stage_fault))

    async def on_stage_fault(self, record: WorkerRecord, fault: str) -> None:
        """The head's chain broke: probe every member at once, mark those that do not answer dead (their death
        re-plans the model); if all answer, rebuild the pipeline anyway."""
        state = self.pipelines[record.info.model]
        state.fault_pending = True
        try:
            state.event(f"stage fault reported by {record.name}: {fault}")
            log.warning("pipeline %s: %s reports a stage fault: %s", state.model, record.name, fault)
            members = [r for r in state.members if r.state != WorkerState.DEAD]
            answered = await asyncio.gather(*(self.answers(r) for r in members))
            silent = [r for r, ok in zip(members, answered) if not ok]
            for r in silent:
                self.registry.mark_dead(r, f"stage unreachable: the pipeline head reported {fault!r}")
            # Either way a re-plan follows; waiting for it (it runs after the ones the deaths queued) keeps the
            # head's repeated reports of the same fault from starting another.
            await self.replan(state.model, f"stage fault: {fault}", rebuild=not silent)
        finally:
            state.fault_pending = False

    def _lose(self, record: WorkerRecord, why: str) -> None:
        """A stage node left: a pipeline it was in takes no new requests until it is re-planned."""
        state = self.pipelines.get(record.info.model)
        if state is None:
            return
        if any(r is record for r in state.members) and state.members[0].serving:
            state.members[0].serving = False
            self._changed(state.model)
        self.replan(state.model, why)

    # -- planning ---------------------------------------------------------------------------------------------

    def replan(self, model: str, why: str, rebuild: bool = False) -> asyncio.Task[None]:
        """Re-plan ``model`` in the background (after any re-plan of it already running); ``rebuild``: assign the
        plan again even when nothing changed (the head's chain must be rebuilt)."""
        return self._spawn(self._replan(model, why, rebuild))

    async def settle(self) -> None:
        """Wait until no re-plan or fault check is running or waiting to run (retries scheduled later aside)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel scheduled retries and running re-plans."""
        for state in self.pipelines.values():
            if state.retry is not None:
                state.retry.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _replan(self, model: str, why: str, rebuild: bool) -> None:
        state = self.pipelines.setdefault(model, PipelineState(model))
        async with state.lock:
            await self._plan(state, why, rebuild)

    async def _plan(self, state: PipelineState, why: str, rebuild: bool) -> None:
        lost = any(self._gone(r) for r in state.members)
        live = self.live(state.model)
        result: PipelinePlan | Shortfall | None = None
        if live:
            result = partition(model_size(live[0].info), [self._node(r, self._order[r.worker_id]) for r in live])
        if not isinstance(result, PipelinePlan):
            if state.serving and lost:
                self._drop(state, why)
            if not state.serving:
                state.status = result.reason if isinstance(result, Shortfall) else WAITING
            return
        by_id = {r.worker_id: r for r in live}
        records = [by_id[s.node_id] for s in result.stages]
        if state.plan is None or lost or rebuild:
            await self._apply(state, result, records, why)
        elif result.ranges() != state.plan.ranges() and better(result, state.plan):
            assert state.changed_at is not None, "a serving pipeline was applied at some time"
            wait = state.changed_at + self.cooldown(state.model) - self.clock()
            if wait > 0:
                self._retry(state, wait, why)
            else:
                await self._apply(state, result, records, f"{why}; faster")

    def _retry(self, state: PipelineState, delay_s: float, why: str) -> None:
        """Re-plan the model again in ``delay_s`` (replacing a retry scheduled before)."""
        if state.retry is not None:
            state.retry.cancel()
        state.retry = asyncio.get_running_loop().call_later(delay_s, self.replan, state.model, why)

    async def _apply(self, state: PipelineState, plan: PipelinePlan, records: list[WorkerRecord], why: str) -> None:
        """Assign ``plan`` to its stages' ``records`` (the head last), release old members it leaves out, and
        serve."""
        self.applying.add(state.model)
        try:
            await self._apply_plan(state, plan, records, why)
        finally:
            self.applying.discard(state.model)

    async def _apply_plan(
        self, state: PipelineState, plan: PipelinePlan, records: list[WorkerRecord], why: str
    ) -> None:
        previous = state.members
        if previous and previous[0].serving:  # no new requests into a chain being rebuilt
            previous[0].serving = False
            self._changed(state.model)
        try:
            kv, head_reply = await self._assign_all(state, plan, records)
        except AssignFailed as exc:
            self._drop(state, why, status=f"re-partition failed: {exc}")
            cooldown = self.cooldown(state.model)
            log.warning("pipeline %s: re-partition failed: %s (retry in %.0f s)", state.model, exc, cooldown)
            self._retry(state, cooldown, "retry after a failed re-partition")
            return
        for old in [r for r in state.assigned.values() if not any(r is n for n in records)]:
            await self._release(state, old)
        for stage, record in zip(plan.stages, records):
            record.info.layer_start, record.info.layer_end = stage.layer_start, stage.layer_end
            self.registry.fresh_start(record)  # requests its old role failed on purpose do not count
        head = records[0]
        head.info.kv_blocks_total = min(kv, head_reply.kv_blocks or kv)
        if head_reply.max_model_len:
            head.info.max_model_len = head_reply.max_model_len
        state.plan, state.members, state.report = plan, tuple(records), None
        state.changed_at = self.clock()
        state.repartitions += 1
        state.status = f"serving: {plan.describe()}"
        state.event(f"{plan.describe()} ({why})")
        self.metrics.pipeline_repartitions_total.labels(model=state.model).inc()
        log.info("pipeline %s: %s (%s)", state.model, plan.describe(), why)
        if any(self._gone(r) for r in records):  # one left while the others loaded: its re-plan is queued
            state.status = "re-partitioning: a stage left during the change"
            return
        head.serving = True
        self._changed(state.model)

    async def _assign_all(
        self, state: PipelineState, plan: PipelinePlan, records: list[WorkerRecord]
    ) -> tuple[int, pb.StageStatus]:
        """Assign the non-head stages, last first, then the head with the pipeline's KV blocks and the route down
        the chain: (the pipeline's KV blocks, the head's answer)."""
        head = records[0]
        common = {
            "model": state.model,
            "weights_fingerprint": head.info.stage.weights_fingerprint,
            "num_layers": head.info.num_layers,
        }
        state.kv_blocks = {}
        for stage, record in reversed(list(zip(plan.stages[1:], records[1:]))):
            assignment = pb.StageAssignment(
                **common, layer_start=stage.layer_start, layer_end=stage.layer_end, kv_blocks=0, name=record.name
            )
            state.kv_blocks[record.worker_id] = (await self._assign_one(state, record, assignment)).kv_blocks
        kv = min([plan.kv_blocks, *state.kv_blocks.values()])
        if kv <= 0:
            raise AssignFailed(f"the stages hold no KV blocks in common (they reported {state.kv_blocks})")
        route = [
            pb.StageRoute(address=r.info.address, name=r.name, layer_start=s.layer_start, layer_end=s.layer_end)
            for s, r in zip(plan.stages[1:], records[1:])
        ]
        assignment = pb.StageAssignment(
            **common,
            layer_start=plan.stages[0].layer_start,
            layer_end=plan.stages[0].layer_end,
            kv_blocks=kv,
            downstream=route,
            depth=self.depth_of(state.model) or len(plan.stages),
            name=head.name,
        )
        reply = await self._assign_one(state, head, assignment)
        state.kv_blocks[head.worker_id] = kv
        return kv, reply

    async def _assign_one(
        self, state: PipelineState, record: WorkerRecord, assignment: pb.StageAssignment
    ) -> pb.StageStatus:
        try:
            reply = await self.assign(record, assignment)
        except _CALL_ERRORS as exc:
            raise AssignFailed(f"{record.name} did not answer its assignment: {_describe(exc)}") from None
        if not reply.ok:
            raise AssignFailed(f"{record.name} refused [{assignment.layer_start}, {assignment.layer_end}): "
                               f"{reply.detail or 'no reason given'}")  # fmt: skip
        state.assigned[record.worker_id] = record
        return reply

    async def _release(self, state: PipelineState, record: WorkerRecord) -> None:
        """Free an old member's layers (it may be gone: errors are ignored)."""
        state.assigned.pop(record.worker_id, None)
        record.serving = False
        record.info.layer_start = record.info.layer_end = 0
        if self._gone(record):
            return
        try:
            await self.assign(record, pb.StageAssignment(model=state.model, release=True, name=record.name))
        except _CALL_ERRORS as exc:
            log.info("pipeline %s: releasing %s failed: %s", state.model, record.name, _describe(exc))

    def _drop(self, state: PipelineState, why: str, status: str | None = None) -> None:
        """The model has no serving pipeline any more."""
        if state.members:
            state.members[0].serving = False
        had = state.plan is not None
        state.plan, state.members, state.report = None, (), None
        if status is not None:
            state.status = status
        state.event(status or f"stopped serving ({why})")
        if had:
            log.warning("pipeline %s: stopped serving (%s)", state.model, why)
        self._changed(state.model)

    # -- helpers ------------------------------------------------------------------------------------------------

    def live(self, model: str) -> list[WorkerRecord]:
        """The admitted stage nodes of ``model`` that may take part in a plan, in registration order."""
        found = [
            r
            for r in self._admitted.values()
            if r.info.model == model and r.state in (WorkerState.HEALTHY, WorkerState.SUSPECT)
        ]
        return sorted(found, key=lambda r: self._order[r.worker_id])

    def _gone(self, record: WorkerRecord) -> bool:
        return self._admitted.get(record.worker_id) is not record or record.state not in (
            WorkerState.HEALTHY,
            WorkerState.SUSPECT,
        )

    def _node(self, record: WorkerRecord, order: int) -> StageNode:
        info = record.info
        link = self.link_s.get(record.worker_id, 0.0)
        return StageNode(record.worker_id, info.name, info.memory_cap_bytes, info.stage.layer_seconds, link, order)

    async def _link_latency(self, record: WorkerRecord, tries: int = 3) -> float:
        """Half the shortest round trip of a few light calls to the node: the partitioner's link latency (the
        gateway's view of the node's network; 0 when it does not answer)."""
        best = None
        for _ in range(tries):
            started = time.perf_counter()
            if not await self.answers(record):
                return 0.0
            took = time.perf_counter() - started
            best = took if best is None else min(best, took)
        return (best or 0.0) / 2

    async def answers(self, record: WorkerRecord) -> bool:
        """Whether a stage node answers at all (the injected probe; its errors count as no)."""
        try:
            return await self.probe(record)
        except _CALL_ERRORS as exc:
            log.info("probe of stage %s failed: %s", record.name, _describe(exc))
            return False

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pipeline re-plan failed", exc_info=task.exception())

    def _changed(self, model: str) -> None:
        for listener in self.on_change:
            listener(model)

    def _observe(self, state: PipelineState, report: pb.PipelineReport, previous: pb.PipelineReport | None) -> None:
        """Metrics from a head's report; its hops only when they are a new step's (an idle head repeats them).

        A new step's transfer time into a later stage, timed by the pipeline itself, also becomes that stage's link
        latency for the next plan (a running mean), in place of the gateway's own view of the node's network."""
        model = state.model
        self.metrics.pipeline_bubble.labels(model=model).set(report.bubble)
        if previous is not None and list(previous.hops) == list(report.hops):
            return
        members = {r.name: r.worker_id for r in state.members}
        for i, hop in enumerate(report.hops):
            self.metrics.pipeline_stage_compute_seconds.labels(model=model, stage=hop.name).observe(hop.compute_s)
            if i == 0:  # the head's own hop has no link into it
                continue
            self.metrics.pipeline_link_transfer_seconds.labels(model=model, stage=hop.name).observe(hop.transfer_s)
            worker_id = members.get(hop.name)
            if worker_id is not None and hop.transfer_s >= 0:
                seen = self.link_s.get(worker_id) if worker_id in self._links_timed else None
                self.link_s[worker_id] = (
                    hop.transfer_s if seen is None else (1 - LINK_WEIGHT) * seen + LINK_WEIGHT * hop.transfer_s
                )
                self._links_timed.add(worker_id)

    async def _grpc_assign(self, record: WorkerRecord, assignment: pb.StageAssignment) -> pb.StageStatus:
        if record.channel is None:
            raise ConnectionError("no connection")
        return await pb_grpc.StageStub(record.channel).Assign(assignment, timeout=self.assign_timeout_s)

    async def _grpc_probe(self, record: WorkerRecord) -> bool:
        if record.stub is None:
            return False
        reply = await record.stub.Health(pb.HealthRequest(generate=False), timeout=PROBE_TIMEOUT_S)
        return reply.ok

    # -- queries ------------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model that has had a stage node admitted."""
        return sorted(self.pipelines)

    def has_stage_nodes(self, model: str) -> bool:
        """Whether the registry lists any stage node of ``model`` (in any state)."""
        return any(w.info.role == STAGE_ROLE and w.info.model == model for w in self.registry.workers.values())

    def serving(self, model: str) -> bool:
        state = self.pipelines.get(model)
        return state is not None and state.serving

    def cooldown(self, model: str) -> float:
        return float(self.overrides(model).get("cooldown", self.cooldown_s))

    def depth_of(self, model: str) -> int:
        return int(self.overrides(model).get("depth", self.depth))

    def assembling(self, model: str) -> bool:
        """Whether a plan of ``model`` is being assigned: requests for it should wait for the head, not fail."""
        return model in self.applying

    def status(self, model: str) -> str:
        state = self.pipelines.get(model)
        return state.status if state is not None else WAITING

    def to_json(self, model: str) -> dict[str, Any]:
        """The pipeline of ``model`` for /v1/models, /admin/pipelines and ``fleetserve nodes list``."""
        return (self.pipelines.get(model) or PipelineState(model)).to_json(self.depth_of(model))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
