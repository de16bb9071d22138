"""The Control gRPC service on the gateway: workers register, heartbeat and deregister here."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

import grpc

from fleetserve.gateway.registry import WorkerRecord, WorkerRegistry
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class ControlService(pb_grpc.ControlServicer):
    """Registration guarded by a shared token; heartbeats keep a worker's record fresh."""

    def __init__(
        self,
        registry: WorkerRegistry,
        token: str = "",
        on_register: Callable[[WorkerRecord], Awaitable[None]] | None = None,
    ):
        self.registry = registry
        self.token = token
        self.on_register = on_register
        self.pending_commands: dict[str, asyncio.Queue[pb.Command]] = {}

    def _check_token(self, token: str) -> bool:
        return not self.token or hmac.compare_digest(token.encode(), self.token.encode())

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        if not self._check_token(request.token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong registration token")
        info = request.info
        if not info.address or not info.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker must give its address and model")
        record = self.registry.register(info)
        if self.on_register is not None:
            try:
                await self.on_register(record)
            except ValueError as exc:  # e.g. a tokenizer that disagrees with the model's other workers
                self.registry.remove(record.worker_id)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RegisterReply(worker_id=record.worker_id, heartbeat_interval_s=self.registry.heartbeat_interval_s)

    async def Heartbeat(self, request_iterator, context: grpc.aio.ServicerContext):
        async for report in request_iterator:
            if self.registry.heartbeat(report) is None:
                yield pb.Command(kind=pb.Command.REREGISTER, detail="unknown worker id")
                return
            queue = self.pending_commands.get(report.worker_id)
            while queue is not None and not queue.empty():
                yield queue.get_nowait()

    async def Deregister(self, request: pb.DeregisterRequest, context) -> pb.DeregisterReply:
        if not self._check_token(request.token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong registration token")
        self.registry.remove(request.worker_id)
        return pb.DeregisterReply()

    def send(self, worker_id: str, command: pb.Command) -> None:
        """Queue a command for a worker; it goes down with the reply to its next heartbeat."""
        self.pending_commands.setdefault(worker_id, asyncio.Queue()).put_nowait(command)
