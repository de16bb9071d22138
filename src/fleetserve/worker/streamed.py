"""Many generations over one call: the worker's side of ``GenerateStreams``.

The gateway starts and cancels generations with the call's messages; each runs as a task of its own, as a
``Generate`` call would, and its chunks go into one outbox as the engine hands them over: all of one step's
outputs in one turn of the event loop, without waking each generation's task. The reply stream sends the outbox
whole whenever it has something, so the tokens one engine step gave all of the call's generations leave
together, as one message. Per message, gRPC costs the worker's event loop about as much as it
costs to stream one token, and that loop shares the interpreter lock with the engine's thread: a message a step
instead of a message a step and generation leaves the engine that much less to wait for.

The call's first reply is empty, sent before anything is read: the gateway waits for it before starting a
generation.

A generation that is refused or fails ends with an error entry (the status Generate's call would have ended
with); the other generations of the call go on. When the gateway closes its side, the call ends once its
generations have; when the call is cancelled (the gateway left), every generation it started is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A generation refused or failed, with the gRPC status its call ends with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


Generate = Callable[[pb.GenerateRequest, str, Callable[[pb.GenerateChunk], None]], Awaitable[None]]
"""Runs one generation (request, log id), handing each chunk to the callable as it comes; Refusal when refused."""


class StreamedGenerations:
    """The generations of one ``GenerateStreams`` call; ``generate`` runs one of them."""

    def __init__(self, generate: Generate):
        self._generate = generate
        self._outbox: list[pb.StreamedChunk] = []
        self._ready = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}

    async def _read(self, requests: AsyncIterator[pb.StreamedRequest]) -> None:
        """Start and cancel generations as the call's messages say, until the gateway closes its side."""
        try:
            async for message in requests:
                if message.HasField("start"):
                    self._start(message.start, message.log_id)
                elif message.cancel:
                    task = self._tasks.get(message.cancel)
                    if task is not None:
                        task.cancel()
        finally:
            self._ready.set()  # the reply stream looks whether it is done

    def _start(self, request: pb.GenerateRequest, log_id: str) -> None:
        rid = request.request_id
        if not rid or rid in self._tasks:
            self._fail(rid, grpc.StatusCode.INVALID_ARGUMENT, "a streamed generation needs a request_id of its own")
            return
        task = asyncio.get_running_loop().create_task(self._run(request, log_id))
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._ended(rid))

    def _ended(self, rid: str) -> None:
        self._tasks.pop(rid, None)
        self._ready.set()  # the last one's end may be what the reply stream waits for

    async def _run(self, request: pb.GenerateRequest, log_id: str) -> None:
        rid = request.request_id

        def emit(chunk: pb.GenerateChunk) -> None:
            self._send(pb.StreamedChunk(request_id=rid, chunk=chunk))

        try:
            await self._generate(request, log_id, emit)
        except Refusal as refusal:
            self._fail(rid, refusal.code, str(refusal))
        except Exception as exc:  # a fault outside the engine's own errors: this generation's alone
            log.exception("streamed generation %s failed", rid)
            self._fail(rid, grpc.StatusCode.INTERNAL, str(exc))

    def _fail(self, rid: str, code: grpc.StatusCode, message: str) -> None:
        self._send(pb.StreamedChunk(request_id=rid, error_code=code.value[0], error=message))

    def _send(self, entry: pb.StreamedChunk) -> None:
        self._outbox.append(entry)
        self._ready.set()

    async def replies(self, requests: AsyncIterator[pb.StreamedRequest]) -> AsyncIterator[pb.StreamedChunks]:
        """The call's replies: first an empty one, then everything sent since the last, whenever there is
        something; they end once the gateway has closed its side and every generation has ended. Closed early
        (the call ended or was cancelled), every generation still running is aborted."""
        yield pb.StreamedChunks()
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._outbox:
                    batch, self._outbox = self._outbox, []
                    yield pb.StreamedChunks(chunks=batch)
                if reader.done() and not self._tasks and not self._outbox:
                    return
        finally:
            tasks = [reader, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
