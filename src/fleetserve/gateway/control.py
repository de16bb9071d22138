"""The Control gRPC service on the gateway: workers register, heartbeat and deregister here; node agents hold their
sessions here.

The fleet secret is checked on every call before it gets here (``protocol.security``). A registration's
advertised address must lie in the gateway's worker networks, if it has any, before the gateway dials it; a
worker it cannot reach is told so in general terms (the details go to the gateway's log, not to the caller, so
that registering is no way to probe the gateway's network). What the gateway needs from a new worker (its
tokenizer) is fetched before the worker is listed, so a listed worker can always be served. Heartbeats and
deregistrations must carry the session secret their registration returned. Heartbeats that tell of a
pipeline (a head's report or stage fault, a stage node draining) are handed to the pipelines' hook as well.

A node agent's session is one stream each way: its reports come up (the first registers the node, by name), and
its plan goes down each time the plan changes (``gateway.nodes``). A newer session of the same node name ends the
older one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

from fleetserve.gateway.nodes import NodeRecord, NodeTable
from fleetserve.gateway.registry import REPLICA_ROLE, ROLES, STAGE_ROLE, WorkerRecord, WorkerRegistry, WorkerState
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import Network, address_allowed

log = logging.getLogger(__name__)

UNREACHABLE = (
    "the gateway could not fetch what it needs from this worker at its advertised address; "
    "check --advertise and the network between them (the gateway's log has the details)"
)


class ControlService(pb_grpc.ControlServicer):
    """Registration within the allowed networks; heartbeats, with their session secret, keep a record fresh."""

    def __init__(
        self,
        registry: WorkerRegistry,
        on_register: Callable[[WorkerRecord], Awaitable[None]] | None = None,
        networks: Sequence[Network] = (),
        prepare: Callable[[WorkerRecord], Awaitable[None]] | None = None,
        on_stage_report: Callable[[WorkerRecord, pb.HeartbeatReport], None] | None = None,
        nodes: NodeTable | None = None,
    ):
        self.registry = registry
        self.on_register = on_register
        """Called once the worker is listed (ValueError refuses it)."""
        self.prepare = prepare
        """Called with a record not yet listed, whose stub reaches the worker (ValueError refuses it)."""
        self.on_stage_report = on_stage_report
        """Called after a heartbeat that carries a stage fault or a pipeline report, or a stage node's draining."""
        self.networks = list(networks)
        self.pending_commands: dict[str, asyncio.Queue[pb.Command]] = {}
        self.nodes = nodes
        """The node agents' table; None: this gateway takes no node agents."""
        self._node_sessions: dict[str, object] = {}  # node id -> the token of its newest session

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        info = request.info
        if not info.address or not info.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker must give its address and model")
        if (info.role or REPLICA_ROLE) not in ROLES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {info.role!r}: one of {', '.join(ROLES)}"
            )
        if self.networks and not await asyncio.to_thread(address_allowed, info.address, self.networks):
            allowed = ", ".join(str(n) for n in self.networks)
            log.warning("registration of %s at %s refused: outside the worker networks", info.name, info.address)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"advertised address {info.address} is outside the gateway's worker networks "
                f"(worker_networks: {allowed})",
            )
        connection = self.registry.connect(info.address)
        try:
            if self.prepare is not None:
                await self.prepare(WorkerRecord("", info, 0.0, 0.0, channel=connection[0], stub=connection[1]))
        except (ValueError, grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            if connection[0] is not None:
                await connection[0].close()
            await self._refuse(info, exc, context)
        record = self.registry.register(info, connection)
        if self.on_register is not None:
            try:
                await self.on_register(record)
            except (ValueError, grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
                self.registry.remove(record.worker_id)
                await self._refuse(info, exc, context)
        return pb.RegisterReply(
            worker_id=record.worker_id,
            heartbeat_interval_s=self.registry.heartbeat_interval_s,
            session_secret=record.session_secret,
        )

    async def Heartbeat(self, request_iterator, context: grpc.aio.ServicerContext):
        async for report in request_iterator:
            for command in self._take(report, "direct", context.peer()):
                if command.kind == pb.Command.REFUSED:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, command.detail)
                yield command
                if command.kind == pb.Command.REREGISTER:
                    return

    async def RelayHeartbeats(self, request_iterator, context: grpc.aio.ServicerContext):
        """A heartbeat relay's stream (``worker.heartbeat_relay``): batches of workers' reports, each taken as that
        worker's own heartbeat; the commands for them go back in batches."""
        async for batch in request_iterator:
            commands = [
                pb.WorkerCommand(worker_id=report.worker_id, command=command)
                for report in batch.reports
                for command in self._take(report, "relay", context.peer())
            ]
            if commands:
                yield pb.CommandBatch(commands=commands)

    def _take(self, report: pb.HeartbeatReport, via: str, peer: str) -> list[pb.Command]:
        """Apply one worker's report, which came ``via`` "direct" or "relay" from ``peer``; the commands that answer
        it: REREGISTER for a worker the gateway does not know (its stream ends), REFUSED for a wrong session secret
        (logged), else whatever is queued for the worker."""
        record = self.registry.workers.get(report.worker_id)
        if record is None or record.state == WorkerState.DEAD:
            return [pb.Command(kind=pb.Command.REREGISTER, detail="unknown worker id")]
        if not self.registry.authenticate(report.worker_id, report.session_secret):
            log.warning("heartbeat for %s (%s, from %s) refused: wrong session secret", report.worker_id, via, peer)
            return [pb.Command(kind=pb.Command.REFUSED, detail="wrong session secret for this worker id")]
        self.registry.heartbeat(report)
        record.heartbeats_via = via
        if self.on_stage_report is not None and _stage_news(record, report):
            self.on_stage_report(record, report)
        queue = self.pending_commands.get(report.worker_id)
        commands = []
        while queue is not None and not queue.empty():
            commands.append(queue.get_nowait())
        return commands

    async def Deregister(self, request: pb.DeregisterRequest, context) -> pb.DeregisterReply:
        if request.worker_id not in self.registry.workers:
            return pb.DeregisterReply()  # gone already
        if not self.registry.authenticate(request.worker_id, request.session_secret):
            log.warning("deregistration of %s from %s refused: wrong session secret", request.worker_id, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong session secret for this worker id")
        self.registry.remove(request.worker_id)
        self.pending_commands.pop(request.worker_id, None)
        return pb.DeregisterReply()

    async def NodeSession(self, request_iterator, context: grpc.aio.ServicerContext):
        if self.nodes is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this gateway takes no node agents")
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        problem = _node_problem(first.info)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        node = self.nodes.connect(first)
        token = object()
        self._node_sessions[node.node_id] = token
        reports = asyncio.ensure_future(self._node_reports(node, request_iterator, token))
        try:
            while self._node_sessions.get(node.node_id) is token and not reports.done():
                if node.changed.is_set():
                    yield self.nodes.plan_message(node, self.registry.heartbeat_interval_s)
                changed = asyncio.ensure_future(node.changed.wait())
                await asyncio.wait(
                    {changed, reports}, timeout=self.registry.heartbeat_interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
        finally:
            reports.cancel()
            if self._node_sessions.get(node.node_id) is token:
                del self._node_sessions[node.node_id]
                self.nodes.disconnect(node)

    async def _node_reports(self, node: NodeRecord, request_iterator, token: object) -> None:
        async for report in request_iterator:
            if self._node_sessions.get(node.node_id) is not token:
                return  # a newer session of this node took over
            if report.info.name != node.name:
                log.warning("node %s reported itself as %r; report ignored", node.name, report.info.name)
                continue
            self.nodes.report(node, report)

    async def _refuse(self, info: pb.WorkerInfo, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        dial = _dial_error(exc)
        if dial is None:  # e.g. a tokenizer that disagrees with the model's other workers
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.warning("registering %s: cannot reach it at %s: %s", info.name, info.address, _describe(dial))
        await context.abort(grpc.StatusCode.UNAVAILABLE, UNREACHABLE)

    def send(self, worker_id: str, command: pb.Command) -> None:
        """Queue a command for a worker; it goes down with the reply to its next heartbeat."""
        self.pending_commands.setdefault(worker_id, asyncio.Queue()).put_nowait(command)


def _node_problem(info: pb.NodeInfo) -> str:
    """What is wrong with a node's first report, if anything."""
    if not info.name:
        return "a node must give its name"
    if not info.host:
        return "a node must give the host its workers listen on"
    if info.max_workers < 1 or info.cpus < 1 or info.memory_bytes < 2**20:
        return "a node must offer at least one worker slot, one core and some memory"
    return ""


def _stage_news(record: WorkerRecord, report: pb.HeartbeatReport) -> bool:
    """Whether a heartbeat says something the pipelines must hear."""
    draining_stage = report.draining and record.info.role == STAGE_ROLE
    return bool(report.stage_fault) or report.HasField("pipeline") or draining_stage


def _dial_error(exc: BaseException) -> BaseException | None:
    """The failed call to the worker behind ``exc`` (itself, its cause or its context), if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (grpc.aio.AioRpcError, asyncio.TimeoutError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
