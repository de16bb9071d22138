"""A worker's link to its gateway: register, heartbeat every interval with load reports, obey commands.

Heartbeats go to the gateway itself, or through a heartbeat relay on the worker's machine when one is given
(``worker.heartbeat_relay``: a node agent's, which sends its workers' reports up together); registering and
deregistering always go to the gateway.

If the gateway goes away or forgets the worker (it restarted), the agent registers again, with backoff, for
as long as the worker lives. Draining is reported in every heartbeat until the worker deregisters. The channel
carries the fleet secret on every call (and runs over mutual TLS when certificates are configured); the session
secret the gateway returns on registering goes with every heartbeat and the deregistration.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.cancellation import raise_if_cancelling
from fleetserve.protocol.security import FleetCredentials

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistrationRefused(Exception):
    """The gateway refused this worker (wrong fleet secret, an address outside its worker networks, or a worker
    that does not fit: another tokenizer, a stage node below the minimum): retrying will not help."""


REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)


async def _within(work: Awaitable[T], wait_s: float) -> T | None:
    """``work``'s result, or None when it takes longer than ``wait_s`` (it goes on; its result is dropped)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=wait_s)
    if task in done:
        return task.result()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" warning
    return None


class WorkerAgent:
    """Keeps one worker registered with one gateway."""

    def __init__(
        self,
        gateway: str,
        info: pb.WorkerInfo,
        stats: Callable[[], pb.WorkerStats],
        credentials: FleetCredentials | None = None,
        on_drain: Callable[[], None] | None = None,
        latency: Callable[[], tuple[float, float]] | None = None,
        block_hashes: Callable[[], Awaitable[set[int]]] | None = None,
        on_stop: Callable[[], None] | None = None,
        pipeline: Callable[[], pb.PipelineReport | None] | None = None,
        sessions: Callable[[], Awaitable[list[pb.PinnedSession]]] | None = None,
        heartbeat_relay: str | None = None,
    ):
        self.gateway = gateway
        self.info = info
        self._stats = stats
        self._on_drain = on_drain
        self._latency = latency or (lambda: (0.0, 0.0))
        self._block_hashes = block_hashes
        self._on_stop = on_stop
        self._pipeline = pipeline
        self._sessions = sessions
        self._last_sessions: list[pb.PinnedSession] = []
        self._stage_fault = ""
        self._wake = asyncio.Event()
        self._reported: set[int] | None = None  # hashes the gateway has been told of; None: send the full set
        self.worker_id: str | None = None
        self._session = ""  # the session secret of the current registration
        self.draining = False
        self.registered = asyncio.Event()
        credentials = credentials or FleetCredentials()
        self._channel = credentials.channel(gateway)
        self._stub = pb_grpc.ControlStub(self._channel)
        # Heartbeats go to a relay when there is one (it sends them on to this gateway with its machine's others).
        self._relay_channel = credentials.channel(heartbeat_relay) if heartbeat_relay else None
        self._heartbeat_stub = pb_grpc.ControlStub(self._relay_channel) if self._relay_channel else self._stub

    async def run(self) -> None:
        """Register and heartbeat until cancelled; a refused registration raises RegistrationRefused."""
        backoff = 0.2
        while True:
            try:
                reply = await self._register()
                backoff = 0.2
                log.info("registered with %s as %s", self.gateway, self.worker_id)
                await self._heartbeat(max(0.05, reply.heartbeat_interval_s or 1.0))
            except grpc.aio.AioRpcError as exc:
                log.info("gateway %s unreachable (%s); retrying in %.1fs", self.gateway, exc.code().name, backoff)
            raise_if_cancelling()
            self.registered.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _register(self) -> pb.RegisterReply:
        try:
            reply = await self._stub.Register(pb.RegisterRequest(info=self.info), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                raise RegistrationRefused(exc.details()) from exc
            raise
        self.worker_id = reply.worker_id
        self._session = reply.session_secret
        self._reported = None
        self.registered.set()
        return reply

    def report_fault(self, reason: str) -> None:
        """A pipeline head's chain broke: say so in a heartbeat now, not at the next interval."""
        self._stage_fault = reason
        self._wake.set()

    async def _wait(self, reregister: asyncio.Event, interval: float) -> None:
        """Until the next report is due: ``interval`` passes, a fault wakes the agent, or it must register again."""
        waits = [asyncio.ensure_future(reregister.wait()), asyncio.ensure_future(self._wake.wait())]
        await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        self._wake.clear()

    async def _heartbeat(self, interval: float) -> None:
        reregister = asyncio.Event()

        async def reports():
            while not reregister.is_set():
                first, inter = self._latency()
                yield pb.HeartbeatReport(
                    worker_id=self.worker_id,
                    stats=self._stats(),
                    recent_first_token_s=first,
                    recent_inter_token_s=inter,
                    draining=self.draining,
                    block_hashes=await self._hash_delta(interval / 2),
                    session_secret=self._session,
                    stage_fault=self._stage_fault,
                    pipeline=self._pipeline() if self._pipeline is not None else None,
                    sessions=await self._pinned_sessions(interval / 2),
                )
                self._stage_fault = ""
                await self._wait(reregister, interval)

        call = self._heartbeat_stub.Heartbeat(reports())
        async for command in call:
            if command.kind == pb.Command.DRAIN:
                log.info("gateway asks this worker to drain")
                self.draining = True
                if self._on_drain:
                    self._on_drain()
            elif command.kind == pb.Command.STOP:
                log.info("gateway asks this worker to stop")
                self.draining = True
                if self._on_stop:
                    self._on_stop()
            elif command.kind == pb.Command.REREGISTER:
                log.info("gateway does not know this worker; registering again")
                reregister.set()
                call.cancel()
                return

    async def _pinned_sessions(self, wait_s: float) -> list[pb.PinnedSession]:
        """The sessions the engine pins, or the last list when the engine is mid-step for longer than ``wait_s``."""
        if self._sessions is not None:
            fresh = await _within(self._sessions(), wait_s)
            if fresh is not None:
                self._last_sessions = fresh
        return self._last_sessions

    async def _hash_delta(self, wait_s: float) -> pb.BlockHashDelta | None:
        """The prefix-cache blocks gained and lost since the last report (everything after registering); None when
        the engine is mid-step for longer than ``wait_s`` (a long prefill): the heartbeat goes without them, on
        time, and the next one catches up."""
        if self._block_hashes is None:
            return None
        current = await _within(self._block_hashes(), wait_s)
        if current is None:
            return None
        if self._reported is None:
            delta = pb.BlockHashDelta(reset=True, added=sorted(current))
        else:
            delta = pb.BlockHashDelta(added=sorted(current - self._reported), removed=sorted(self._reported - current))
        self._reported = current
        return delta

    async def deregister(self) -> None:
        if self.worker_id is None:
            return
        try:
            request = pb.DeregisterRequest(worker_id=self.worker_id, session_secret=self._session)
            await self._stub.Deregister(request, timeout=3)
        except grpc.aio.AioRpcError as exc:
            log.info("deregistration failed (%s); the gateway will time this worker out", exc.code().name)

    async def close(self) -> None:
        await self._channel.close()
        if self._relay_channel is not None:
            await self._relay_channel.close()


async def until_stopped(stop: asyncio.Event, agent_tasks: set[asyncio.Task]) -> int:
    """Wait until ``stop`` is set or an agent's task ends; the worker's exit code: 0 when stopped, 3 when a gateway
    refused it (said on stderr), 1 when an agent failed otherwise."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, *agent_tasks}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in done & agent_tasks:
        exc = task.exception()
        if exc is not None:
            print(f"fleetserve worker: registration refused: {exc}", file=sys.stderr, flush=True)
            return 3 if isinstance(exc, RegistrationRefused) else 1
    return 0
