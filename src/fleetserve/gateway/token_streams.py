"""Generations on a worker, over one call that carries them all.

A worker that has ``GenerateStreams`` gets every generation the gateway sends it on one long call: a message
starts or cancels one, and each reply carries the chunks one engine step gave all of them (``worker.streamed``).
gRPC costs about as much per message as per token at these sizes, on both ends, so a step's tokens in one
message rather than one message per generation saves the worker's event loop and the gateway most of their
per-token work. A worker without it (an older one) gets one ``Generate`` call per generation, as before.

The worker answers a new call with an empty reply, and the gateway sends nothing before it: a worker without the
RPC then refuses the call cleanly (UNIMPLEMENTED), where a message still in flight would have made it fail as
INTERNAL.

Every generation reads the same chunks and meets the same gRPC statuses either way, so the dispatcher's retries
and failover do not know which way it went: a refusal or failure of one generation comes back as its status; a
call that breaks (the worker died, or was declared dead and its channel closed) ends all of its generations with
UNAVAILABLE or CANCELLED, and the next generation opens a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _Unsupported(Exception):
    """The worker has no GenerateStreams."""


class _Call:
    """One GenerateStreams call and the generations waiting on it."""

    def __init__(self, stub: pb_grpc.WorkerStub):
        self.outgoing: asyncio.Queue[pb.StreamedRequest | None] = asyncio.Queue()
        self.waiting: dict[str, asyncio.Queue[pb.StreamedChunk | tuple[grpc.StatusCode, str]]] = {}
        self.ended: tuple[grpc.StatusCode, str] | None = None
        """Why the call ended (a status and its details); None while it runs."""
        self.answered = asyncio.Event()
        """Set by the worker's first reply (empty), or when the call ends without one."""
        self._call = stub.GenerateStreams(self._messages())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _messages(self) -> AsyncIterator[pb.StreamedRequest]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        ended = (grpc.StatusCode.UNAVAILABLE, "the worker ended the call that carried this generation")
        try:
            async for batch in self._call:
                self.answered.set()
                for entry in batch.chunks:
                    queue = self.waiting.get(entry.request_id)
                    if queue is not None:
                        queue.put_nowait(entry)
        except grpc.aio.AioRpcError as exc:
            ended = (exc.code(), exc.details() or "")
        except asyncio.CancelledError:  # the channel was closed under the call: the worker was declared dead
            ended = (grpc.StatusCode.CANCELLED, "the call was cut off (the worker left)")
        except Exception as exc:  # anything else that breaks the call ends its generations, not the gateway
            ended = (grpc.StatusCode.UNKNOWN, f"the call failed: {exc}")
        self.ended = ended
        self.answered.set()
        self.outgoing.put_nowait(None)  # what sends the call's messages stops too
        for queue in self.waiting.values():
            queue.put_nowait(ended)


class TokenStreams:
    """The generations the gateway sends one worker (through ``stub``)."""

    def __init__(self, stub: pb_grpc.WorkerStub):
        self.stub = stub
        self.supported = True
        """False once the worker has answered that it has no GenerateStreams: one Generate call each since."""
        self._call: _Call | None = None

    async def chunks(self, request: pb.GenerateRequest, log_id: str) -> AsyncIterator[pb.GenerateChunk]:
        """The generation's chunks until one carries a finish reason; grpc.aio.AioRpcError when it fails, as a
        Generate call's would. Closing this early cancels it on the worker. ``log_id``: the id the worker's log
        lines give it."""
        if self.supported:
            try:
                async with contextlib.aclosing(self._streamed(request, log_id)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except _Unsupported:
                self.supported = False
        call = self.stub.Generate(request, metadata=(("x-request-id", log_id),))
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()  # no-op when the call is done; aborts the request on the worker otherwise

    async def _streamed(self, request: pb.GenerateRequest, log_id: str) -> AsyncIterator[pb.GenerateChunk]:
        if self._call is None or self._call.ended is not None:
            self._call = _Call(self.stub)
        call, rid = self._call, request.request_id
        # Nothing is sent before the worker's first reply: a worker without the RPC answers UNIMPLEMENTED at once,
        # and a message still being sent then would make the call fail as INTERNAL instead.
        await call.answered.wait()
        if call.ended is not None:
            if call.ended[0] == grpc.StatusCode.UNIMPLEMENTED:
                raise _Unsupported()
            raise _status(*call.ended)
        queue: asyncio.Queue[pb.StreamedChunk | tuple[grpc.StatusCode, str]] = asyncio.Queue()
        call.waiting[rid] = queue
        finished = False
        try:
            call.outgoing.put_nowait(pb.StreamedRequest(start=request, log_id=log_id))
            while True:
                entry = await queue.get()
                if isinstance(entry, tuple):
                    finished = True
                    raise _status(*entry)
                if entry.error_code:
                    finished = True
                    raise _status(_CODES.get(entry.error_code, grpc.StatusCode.UNKNOWN), entry.error)
                finished = bool(entry.chunk.finish_reason)
                yield entry.chunk
                if finished:
                    return
        finally:
            call.waiting.pop(rid, None)
            if not finished and call.ended is None:  # left early: abort it on the worker
                call.outgoing.put_nowait(pb.StreamedRequest(cancel=rid))
