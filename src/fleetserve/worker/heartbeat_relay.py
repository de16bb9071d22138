"""A heartbeat relay: the workers of one machine heartbeat to it, and it sends their reports on to the gateway
together, one message per interval for all of them instead of one per worker each.

Why: what a heartbeat costs the gateway is mostly gRPC's path for one message (thread hand-offs between its
poller threads and the event loop: on the order of 100 µs of CPU), not the report itself (about 8 µs). A
thousand workers heartbeating once a second directly cost a gateway core 11-15%; relayed by one node agent per
machine, the gateway gets one message per machine per interval (docs/benchmarks.md, "The gateway at 1,000
workers").

The relay serves the Control service's ``Heartbeat`` call and nothing else (workers register and deregister with
the gateway directly), behind the fleet's credentials like every server in the fleet: the fleet secret on every
call, mutual TLS when certificates are configured. A worker needs only its address (``fleetserve worker
--heartbeat-relay HOST:PORT``; a node agent runs one and gives its address to the workers it starts). Upstream
it holds one ``RelayHeartbeats`` stream with the gateway, on the same credentials. Each report keeps its
worker's session secret, which the gateway checks as for a direct heartbeat.

- Reports go up in the order they came, in a batch that is sent once every worker with an open stream has
  reported since the last batch, or ``flush_s`` after the batch's first report, whichever comes first. A report
  that must not wait (a stage fault, a worker that starts or stops draining) goes at once with what is pending.
- Commands for a worker (drain, stop, register again) come back in the gateway's replies and go down that
  worker's stream. A report the gateway refuses (a wrong session secret) ends that worker's stream with
  UNAUTHENTICATED, as the gateway itself would.
- When the upstream stream breaks, every worker's stream ends with UNAVAILABLE, as when a gateway goes away: the
  workers register again and their block-hash reports start afresh, so nothing is reported twice or lost
  between the gateway's view and theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.cancellation import raise_if_cancelling
from fleetserve.protocol.security import FleetCredentials

log = logging.getLogger(__name__)

_ENDED = "ended"  # the worker closed its stream
_BROKEN = "broken"  # the upstream stream broke


class HeartbeatRelay(pb_grpc.ControlServicer):
    """Forwards the heartbeats of local workers to one gateway in batches (see the module docstring)."""

    def __init__(self, gateway: str, credentials: FleetCredentials | None = None, flush_s: float = 1.0):
        self.gateway = gateway
        self.credentials = credentials or FleetCredentials()
        self.flush_s = flush_s
        """Longest a report waits for company (a node agent sets it to the gateway's heartbeat interval)."""
        self._streams: dict[str, asyncio.Queue] = {}  # worker id -> what goes down its stream
        self._pending: list[pb.HeartbeatReport] = []
        self._reported: set[str] = set()  # workers with a report in the pending batch
        self._draining: dict[str, bool] = {}
        self._first_at = 0.0
        self._urgent = False
        self._changed = asyncio.Event()
        self.batches_sent = 0
        self.reports_sent = 0

    # -- the workers' side -------------------------------------------------------------------------------

    async def Heartbeat(self, request_iterator, context: grpc.aio.ServicerContext):
        down: asyncio.Queue = asyncio.Queue()
        ids: list[str] = []
        reader = asyncio.ensure_future(self._take_reports(request_iterator, down, ids))
        try:
            while True:
                item = await down.get()
                if item == _BROKEN:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the relay lost its gateway")
                if isinstance(item, str):  # _ENDED
                    return
                if item.kind == pb.Command.REFUSED:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, item.detail)
                yield item
                if item.kind == pb.Command.REREGISTER:
                    return
        finally:
            reader.cancel()
            for worker_id in ids:
                if self._streams.get(worker_id) is down:
                    del self._streams[worker_id]
                    self._draining.pop(worker_id, None)

    async def _take_reports(self, request_iterator, down: asyncio.Queue, ids: list[str]) -> None:
        try:
            async for report in request_iterator:
                if report.worker_id not in ids:
                    ids.append(report.worker_id)
                self._streams[report.worker_id] = down  # commands go to the stream that reported it last
                self._add(report)
        except grpc.aio.AioRpcError:
            pass  # the worker went: its stream is over
        finally:
            down.put_nowait(_ENDED)

    def _add(self, report: pb.HeartbeatReport) -> None:
        if not self._pending:
            self._first_at = asyncio.get_running_loop().time()
        self._pending.append(report)
        self._reported.add(report.worker_id)
        was_draining = self._draining.get(report.worker_id, False)
        self._draining[report.worker_id] = report.draining
        if report.stage_fault or report.draining != was_draining:
            self._urgent = True
        self._changed.set()

    # -- the gateway's side ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the upstream stream until cancelled, reconnecting with backoff when it breaks."""
        channel = self.credentials.channel(self.gateway)
        stub = pb_grpc.ControlStub(channel)
        backoff = 0.2
        try:
            while True:
                await self._wait_for_reports()
                try:
                    async for reply in stub.RelayHeartbeats(self._batches()):
                        backoff = 0.2
                        for command in reply.commands:
                            self._deliver(command)
                    log.warning("heartbeat relay: the gateway ended the stream")
                except grpc.aio.AioRpcError as exc:
                    log.info("heartbeat relay: gateway %s unreachable (%s)", self.gateway, exc.code().name)
                raise_if_cancelling()
                self._break()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            self._break()
            await channel.close()

    async def _wait_for_reports(self) -> None:
        while not self._pending:
            self._changed.clear()
            await self._changed.wait()

    async def _batches(self):
        while True:
            await self._due()
            batch = pb.HeartbeatBatch(reports=self._pending)
            self._pending = []
            self._reported = set()
            self._urgent = False
            self.batches_sent += 1
            self.reports_sent += len(batch.reports)
            yield batch

    async def _due(self) -> None:
        """Until the pending batch should go (see the module docstring)."""
        loop = asyncio.get_running_loop()
        while True:
            wait = None
            if self._pending:
                if self._urgent or self._reported.issuperset(self._streams):
                    return
                wait = self._first_at + self.flush_s - loop.time()
                if wait <= 0:
                    return
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def _deliver(self, command: pb.WorkerCommand) -> None:
        down = self._streams.get(command.worker_id)
        if down is not None:
            down.put_nowait(command.command)

    def _break(self) -> None:
        """The upstream is gone: end every worker's stream (they register again) and drop what was pending."""
        for down in self._streams.values():
            down.put_nowait(_BROKEN)
        self._streams.clear()
        self._draining.clear()
        self._pending = []
        self._reported = set()
        self._urgent = False


async def serve_relay(relay: HeartbeatRelay, address: str) -> tuple[grpc.aio.Server, int]:
    """Start ``relay`` on a server of its own at ``address`` (HOST:PORT, port 0: a free one), behind the relay's
    credentials; the server and its port. The relay's upstream stream is started by ``relay.run()``."""
    server = relay.credentials.server()
    pb_grpc.add_ControlServicer_to_server(relay, server)
    port = relay.credentials.server_port(server, address)
    await server.start()
    return server, port
