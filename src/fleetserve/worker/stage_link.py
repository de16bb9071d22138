"""The head's link down its chain of stages: one Forward stream to the next stage, over the fleet's credentials.

The engine thread calls ``send`` and ``receive`` (the engine's StageLink); the stream lives on the worker's event
loop. Messages cross between the two through queues; a broken stream (a stage died, was reassigned, or refused a
step) turns into StageLinkError on the engine's side and a fault report for the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable

import grpc
import torch

from fleetserve.contract import StageResult, StageSeq
from fleetserve.engine.pipeline import tensor_bytes, tensor_from_bytes
from fleetserve.errors import InvalidRequestError, StageLinkError
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    data, shape, dtype = tensor_bytes(tensor)
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


def tensor_from_proto(msg: pb.Tensor, columns: int) -> torch.Tensor:
    return tensor_from_bytes(msg.data, list(msg.shape), msg.dtype, columns)


class GrpcStageLink:
    """A Forward stream from the head to ``route[0]``, which passes the steps on along ``route``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        credentials: FleetCredentials,
        opening: pb.StageOpen,
        hidden_size: int,
        on_fault: Callable[[str], None] | None = None,
    ):
        self._loop = loop
        self._credentials = credentials
        self._opening = opening
        self._hidden_size = hidden_size
        self._on_fault = on_fault
        self._outgoing: asyncio.Queue[pb.StageMessage | None] = asyncio.Queue()
        self._results: queue.Queue[StageResult | StageLinkError] = queue.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._reader: asyncio.Task | None = None
        self.broken: str | None = None
        self._closed = False
        first = opening.route[0]
        self.next_stage = f"{first.name} at {first.address}"

    async def open(self, timeout_s: float) -> None:
        """Open the stream and wait until every stage down the chain accepted it; StageLinkError otherwise."""
        self._channel = self._credentials.channel(self._opening.route[0].address, options=CHANNEL_OPTIONS)
        self._call = pb_grpc.StageStub(self._channel).Forward(self._requests())
        self._outgoing.put_nowait(pb.StageMessage(open=self._opening))
        try:
            reply = await asyncio.wait_for(self._call.read(), timeout_s)
        except grpc.aio.AioRpcError as exc:
            await self._shutdown()
            raise StageLinkError(f"stage {self.next_stage} refused the pipeline: {exc.details()}") from exc
        except asyncio.TimeoutError as exc:
            await self._shutdown()
            raise StageLinkError(f"stage {self.next_stage} did not answer within {timeout_s:.0f}s") from exc
        if reply is grpc.aio.EOF or not reply.opened:
            await self._shutdown()
            raise StageLinkError(f"stage {self.next_stage} closed the stream instead of opening it")
        self._reader = asyncio.create_task(self._read())

    async def _requests(self):
        while True:
            msg = await self._outgoing.get()
            if msg is None:
                return
            yield msg

    async def _read(self) -> None:
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    self._fail(f"stage {self.next_stage} ended the stream")
                    return
                self._results.put(self._result(reply))
        except grpc.aio.AioRpcError as exc:
            planned = exc.code() == grpc.StatusCode.ABORTED  # the gateway is changing the pipeline: no fault
            self._fail(f"stage {self.next_stage}: {exc.code().name}: {exc.details()}", planned)
        except asyncio.CancelledError:
            self._fail("the link was closed")
            raise

    def _result(self, reply: pb.StageReply) -> StageResult:
        hops = [convert.hop_from_proto(h) for h in reply.hops]
        if reply.error:
            return StageResult(reply.step, None, hops, reply.error)
        try:
            hidden = tensor_from_proto(reply.hidden, self._hidden_size)
        except InvalidRequestError as exc:
            return StageResult(reply.step, None, hops, f"the last stage's answer: {exc}")
        returned = max(0.0, time.time() - reply.sent_unix) if reply.sent_unix else 0.0
        return StageResult(reply.step, hidden, hops, "", returned, len(reply.hidden.data))

    def _fail(self, reason: str, planned: bool = False) -> None:
        if self.broken is not None:
            return
        self.broken = reason
        self._results.put(StageLinkError(reason, planned))
        if not self._closed and not planned:
            log.warning("pipeline link broke: %s", reason)
            if self._on_fault is not None:
                self._on_fault(reason)

    # -- the engine thread's side ----------------------------------------------------------------------------

    def send(self, step: int, seqs: list[StageSeq], hidden: torch.Tensor) -> None:
        if self.broken is not None:
            raise StageLinkError(self.broken)
        msg = pb.StageMessage(
            step=pb.StageStep(
                step=step,
                seqs=convert.stage_seqs_to_proto(seqs),
                hidden=tensor_to_proto(hidden),
                sent_unix=time.time(),
            )
        )
        self._loop.call_soon_threadsafe(self._outgoing.put_nowait, msg)

    def receive(self, timeout: float) -> StageResult | None:
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, StageLinkError):
            self._results.put(item)  # stays broken for every later call
            raise item
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))

    async def _shutdown(self) -> None:
        self._closed = True
        self._outgoing.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        if self._channel is not None:
            await self._channel.close(grace=None)
