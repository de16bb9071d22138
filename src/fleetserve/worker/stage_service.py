"""A stage node's gRPC services: Stage (Assign, Forward) and the Worker service, which only a head answers.

Forward: the first message opens the stream (checked against this stage's assignment), and a stage with stages
after it opens the next link before it answers. Each step then runs this stage's layers on a single compute
thread (steps stay in order, so a block freed by the head is reused only after earlier steps passed), and goes on
down the chain; the last stage sends the sampling rows back up. A step that does not fit (wrong shape, bad block
table) fails alone with an error reply; a broken link ends the stream, which the stages before it pass up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc

from fleetserve.contract import StageHop
from fleetserve.engine.pipeline import sampling_rows
from fleetserve.errors import InvalidRequestError, StageLinkError
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.worker.server import WorkerService
from fleetserve.worker.stage_host import OPEN_TIMEOUT_S, StageHost
from fleetserve.worker.stage_link import CHANNEL_OPTIONS, tensor_from_proto, tensor_to_proto

log = logging.getLogger(__name__)
_END = object()


class StageService(pb_grpc.StageServicer):
    def __init__(self, host: StageHost):
        self.host = host

    async def Assign(self, request: pb.StageAssignment, context) -> pb.StageStatus:
        return await self.host.assign(request)

    async def Forward(self, request_iterator, context: grpc.aio.ServicerContext):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Forward stream starts with StageOpen")
        problem = self.host.check_opening(first.open)
        if problem is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        route = list(first.open.route)
        generation = self.host.generation
        results: asyncio.Queue = asyncio.Queue()
        downstream = await self._open_next(first.open, context) if len(route) > 1 else None
        self.host.streams.add(results)
        tasks = [asyncio.create_task(self._steps(context, route[0], generation, downstream, results))]
        if downstream is not None:
            tasks.append(asyncio.create_task(self._relay(downstream[1], route[1], results)))
        try:
            yield pb.StageReply(opened=True)
            while True:
                item = await results.get()
                if item is _END:
                    return
                if isinstance(item, StageLinkError):
                    code = grpc.StatusCode.ABORTED if item.planned else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, str(item))
                yield item
        finally:
            self.host.streams.discard(results)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if downstream is not None:
                downstream[1].cancel()
                await downstream[0].close(grace=None)

    async def _open_next(self, opening: pb.StageOpen, context) -> tuple[grpc.aio.Channel, object, asyncio.Queue]:
        route = list(opening.route)
        nxt = route[1]
        channel = self.host.credentials.channel(nxt.address, options=CHANNEL_OPTIONS)
        outgoing: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (msg := await outgoing.get()) is not None:
                yield msg

        call = pb_grpc.StageStub(channel).Forward(requests())
        outgoing.put_nowait(
            pb.StageMessage(
                open=pb.StageOpen(
                    weights_fingerprint=opening.weights_fingerprint,
                    num_layers=opening.num_layers,
                    kv_blocks=opening.kv_blocks,
                    route=route[1:],
                )
            )
        )
        try:
            reply = await asyncio.wait_for(call.read(), OPEN_TIMEOUT_S)
            ok = reply is not grpc.aio.EOF and reply.opened
            detail = "it closed the stream"
        except grpc.aio.AioRpcError as exc:
            ok, detail = False, exc.details()
        except asyncio.TimeoutError:
            ok, detail = False, "no answer in time"
        if not ok:
            call.cancel()
            await channel.close(grace=None)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"next stage {nxt.name} at {nxt.address}: {detail}"
            )
        return channel, call, outgoing

    async def _steps(self, context, me: pb.StageRoute, generation: int, downstream, results: asyncio.Queue) -> None:
        """Read steps from the stage before as they arrive and queue them on the compute thread (which keeps their
        order); pass each result on (or back) as it is done."""
        loop = asyncio.get_running_loop()
        running: asyncio.Queue = asyncio.Queue()
        forwarder = asyncio.create_task(self._forward_results(running, downstream, results))
        try:
            while (msg := await context.read()) is not grpc.aio.EOF:
                if msg.WhichOneof("kind") != "step":
                    continue
                arrived = time.time()  # the transfer ends here; waiting for the compute thread is not part of it
                run = functools.partial(self._run, msg.step, me, generation, downstream is not None, arrived)
                running.put_nowait(loop.run_in_executor(self.host.compute, run))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            forwarder.cancel()
        running.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await forwarder
        results.put_nowait(_END)

    @staticmethod
    async def _forward_results(running: asyncio.Queue, downstream, results: asyncio.Queue) -> None:
        while (pending := await running.get()) is not None:
            reply = await pending
            if downstream is not None and isinstance(reply, pb.StageMessage):
                downstream[2].put_nowait(reply)
            else:
                results.put_nowait(reply)

    def _run(
        self, step: pb.StageStep, me: pb.StageRoute, generation: int, has_next: bool, arrived: float
    ) -> pb.StageMessage | pb.StageReply:
        """One step on the compute thread: the next stage's message, or the reply for the head. A step of a stream
        opened before this stage's latest assignment is refused: its block ids mean nothing to the new layers."""
        executor = self.host.executor
        started = time.monotonic()
        try:
            if executor is None or generation != self.host.generation:
                raise InvalidRequestError("this stage was reassigned since the stream opened", "stage")
            hidden = tensor_from_proto(step.hidden, self.host.arch.hidden_size)
            transfer = max(0.0, arrived - step.sent_unix) if step.sent_unix else 0.0
            seqs = convert.stage_seqs_from_proto(step.seqs)
            out = executor.run(seqs, hidden)
            if not has_next:
                out = sampling_rows(seqs, out)
        except Exception as exc:  # this step only: the head fails its requests, the stream goes on
            log.warning("stage step %d failed: %s", step.step, exc)
            return pb.StageReply(step=step.step, error=f"stage {self.host.name}: {exc}", hops=step.hops)
        hop = StageHop(me.name or self.host.name, me.layer_start, me.layer_end, time.monotonic() - started, transfer)
        hop.bytes = len(step.hidden.data)
        hops = [*step.hops, convert.hop_to_proto(hop)]
        if has_next:
            return pb.StageMessage(
                step=pb.StageStep(
                    step=step.step, seqs=step.seqs, hidden=tensor_to_proto(out), hops=hops, sent_unix=time.time()
                )
            )
        return pb.StageReply(step=step.step, hidden=tensor_to_proto(out), hops=hops, sent_unix=time.time())

    async def _relay(self, call, nxt: pb.StageRoute, results: asyncio.Queue) -> None:
        """Pass the next stage's replies up; its failure ends this stream too."""
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                results.put_nowait(reply)
            results.put_nowait(StageLinkError(f"stage {nxt.name} at {nxt.address} ended the stream"))
        except grpc.aio.AioRpcError as exc:
            planned = exc.code() == grpc.StatusCode.ABORTED
            text = f"stage {nxt.name} at {nxt.address}: {exc.code().name}: {exc.details()}"
            results.put_nowait(StageLinkError(text, planned=planned))


class StageWorkerService(pb_grpc.WorkerServicer):
    """The Worker service of a stage node: the head's engine serves it; other stages answer UNAVAILABLE."""

    def __init__(self, host: StageHost, model_name: str, fingerprint: str):
        self.host = host
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.inner: WorkerService | None = None

    def set_engine(self, engine) -> None:
        self.inner = WorkerService(engine, self.model_name, self.fingerprint) if engine is not None else None

    async def _head(self, context) -> WorkerService:
        if self.inner is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this stage node is not a pipeline's head")
        return self.inner

    async def Generate(self, request, context):
        inner = await self._head(context)
        async for chunk in inner.Generate(request, context):
            yield chunk

    async def Abort(self, request, context):
        return pb.AbortReply() if self.inner is None else await self.inner.Abort(request, context)

    async def Stats(self, request, context):
        return pb.WorkerStats() if self.inner is None else await self.inner.Stats(request, context)

    async def Health(self, request, context):
        if self.inner is not None:
            return await self.inner.Health(request, context)
        start, end = self.host.range
        return pb.HealthReply(
            ok=True, detail=f"stage node, layers [{start}, {end})" if end else "stage node, no layers"
        )

    async def GetTokenizer(self, request, context):
        from fleetserve.text.tokenizer import tokenizer_files

        files = tokenizer_files(self.host.model_dir)
        return pb.TokenizerFiles(model=self.model_name, files=files, fingerprint=self.fingerprint)

    def draining(self, value: bool) -> None:
        if self.inner is not None:
            self.inner.draining = value
