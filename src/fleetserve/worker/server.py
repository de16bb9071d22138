"""The Worker gRPC service: validates and decodes requests, runs them on the AsyncEngine, streams token ids.

Errors become gRPC statuses here and only here: bad input INVALID_ARGUMENT (a priority outside
PRIORITY_MIN..PRIORITY_MAX included: the health probe's place ahead of every request is the worker's own), no
room RESOURCE_EXHAUSTED, a draining or stopped engine UNAVAILABLE, a failed engine step INTERNAL (the gateway
retries it elsewhere). A cancelled call (the gateway's client went away) aborts the request. ``Generate`` runs
one generation a call; ``GenerateStreams`` many on one call (``worker.streamed``), each ending with the status its
own ``Generate`` call would have had. With a fleet secret, every RPC is refused without it (``protocol.security``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from fleetserve.contract import KVTransfer, RequestOutput, SamplingParams
from fleetserve.engine.async_engine import AsyncEngine, EngineDeadError
from fleetserve.errors import CapacityError, EngineStepError, InvalidRequestError
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import PRIORITY_MAX, PRIORITY_MIN, FleetCredentials
from fleetserve.telemetry.metrics import WorkerMetrics
from fleetserve.telemetry.tracing import request_id_var
from fleetserve.text.tokenizer import tokenizer_files
from fleetserve.worker.kv_transfer import KvFetcher, KvTransferService
from fleetserve.worker.streamed import Refusal, StreamedGenerations

log = logging.getLogger(__name__)


ENGINE_ERRORS = (InvalidRequestError, CapacityError, EngineDeadError, EngineStepError)
"""What the engine raises about one request; ``_Generation.refusal`` gives each its gRPC status."""

Emit = Callable[[pb.GenerateChunk], None]


class _Generation:
    """One admitted generation's bookkeeping: its engine outputs become chunks (with its timings and the
    worker's metrics), and the engine's errors the status its call ends with."""

    def __init__(self, service: WorkerService, arrived: float, received: pb.KvReceived | None):
        self.service = service
        self.arrived = arrived
        self.received = received
        self.first = True
        self.last = arrived

    def chunk(self, out: RequestOutput) -> pb.GenerateChunk:
        now = time.monotonic()
        gap = now - self.last
        if not self.first:  # a chunk of several tokens (a stream interval, speculation): their mean gap
            gap /= max(1, len(out.new_token_ids))
        self.service.observe(self.first, gap)
        metrics = self.service.metrics
        if metrics is not None:
            if self.first:
                metrics.time_to_first_token_seconds.observe(now - self.arrived)
            metrics.generation_tokens_total.inc(len(out.new_token_ids))
            if out.finish_reason:
                metrics.requests_total.labels(outcome="cancelled" if out.finish_reason == "abort" else "ok").inc()
        chunk = convert.output_to_chunk(out, first=self.first, queue_s=now - self.arrived if self.first else 0.0)
        if self.first and self.received is not None:
            chunk.kv_received.CopyFrom(self.received)
        self.first = False
        self.last = now
        return chunk

    def refusal(self, exc: Exception) -> Refusal:
        if isinstance(exc, InvalidRequestError):
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, CapacityError):
            return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, EngineDeadError):
            return Refusal(grpc.StatusCode.UNAVAILABLE, str(exc))
        # A failed step: only this request's step failed; the engine serves on.
        if self.service.metrics is not None:
            self.service.metrics.requests_total.labels(outcome="error").inc()
        return Refusal(grpc.StatusCode.INTERNAL, str(exc))


class WorkerService(pb_grpc.WorkerServicer):
    """Serves one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, model_name: str, fingerprint: str):
        self.engine = engine
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.draining = False
        self._files = tokenizer_files(Path(engine.engine.model_dir))
        self._health_prompt = [engine.engine.arch.bos_token_id or 0]
        self.metrics: WorkerMetrics | None = None
        self.kv_fetcher: KvFetcher | None = None
        """Fetches prompts' KV from prefill workers (requests that come with a kv_source)."""
        """Prometheus metrics, when the worker serves them (--metrics-port)."""
        self._first_token_s = 0.0  # moving averages for heartbeats
        self._inter_token_s = 0.0

    def recent_latency(self) -> tuple[float, float]:
        """Exponential moving averages of time to first token and between tokens, in seconds."""
        return self._first_token_s, self._inter_token_s

    def observe(self, first: bool, seconds: float) -> None:
        """Fold one generation's time to its first token (``first``) or between two tokens into the averages."""
        if first:
            self._first_token_s = seconds if not self._first_token_s else 0.8 * self._first_token_s + 0.2 * seconds
        else:
            self._inter_token_s = seconds if not self._inter_token_s else 0.9 * self._inter_token_s + 0.1 * seconds

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        try:
            async with contextlib.aclosing(self._chunks(request, metadata.get("x-request-id", ""))) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Refusal as refusal:
            await context.abort(refusal.code, str(refusal))

    async def GenerateStreams(self, requests: AsyncIterator[pb.StreamedRequest], context: grpc.aio.ServicerContext):
        """Generations started and cancelled by the call's messages; each reply carries every chunk produced
        since the last one, of any of them (one message a step for all, not one per generation)."""
        async with contextlib.aclosing(StreamedGenerations(self._emit_chunks).replies(requests)) as replies:
            async for batch in replies:
                yield batch

    async def _admit(self, request: pb.GenerateRequest, log_id: str) -> tuple[_Generation, dict[str, Any]]:
        """Check a generation and fetch its KV if it brings a source: its bookkeeping and the engine's arguments
        for it. Refusal when it is refused."""
        if self.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "worker is draining: send this request elsewhere")
        if not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {request.priority}",
            )
        arrived = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        # The gateway's request id (several calls of one request share it), for this worker's log lines.
        request_id_var.set(log_id or rid)
        prompt = list(request.prompt_token_ids)
        received, kv_import = None, None
        if request.HasField("kv_source"):
            received, kv_import = await self._receive_kv(request.kv_source, prompt)
        arguments = {
            "prompt_token_ids": prompt,
            "params": convert.sampling_from_proto(request.params),
            "request_id": rid,
            "priority": request.priority,
            "resumed_output": list(request.resumed_output_ids) or None,
            "kv_import": kv_import,
            "session_id": request.session_id or None,
            "session_ttl_s": request.session_ttl_s or None,
            "prefill_only": request.prefill_only,
        }
        return _Generation(self, arrived, received), arguments

    async def _chunks(self, request: pb.GenerateRequest, log_id: str) -> AsyncIterator[pb.GenerateChunk]:
        """One generation's chunks; Refusal (a gRPC status and its message) when it is refused or fails."""
        generation, arguments = await self._admit(request, log_id)
        stream = self.engine.generate(**arguments)
        try:
            async for out in stream:
                yield generation.chunk(out)
        except ENGINE_ERRORS as exc:
            raise generation.refusal(exc) from exc
        finally:
            await stream.aclose()  # a cancelled call lands here: the engine aborts the request

    async def _emit_chunks(self, request: pb.GenerateRequest, log_id: str, emit: Emit) -> None:
        """One generation, its chunks handed to ``emit`` as the engine gives them (on the event loop, no task
        woken per chunk); returns when it has finished. Refusal when it is refused or fails; cancelled, it is
        aborted."""
        generation, arguments = await self._admit(request, log_id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def sink(item: RequestOutput | BaseException) -> None:
            if done.done():
                return
            if isinstance(item, BaseException):
                done.set_exception(item)
                return
            try:
                emit(generation.chunk(item))
            except Exception as exc:  # this generation's fault alone; it is aborted below
                done.set_exception(exc)
                return
            if item.finished:
                done.set_result(None)

        rid: str | None = None
        try:
            rid = await self.engine.start(**arguments, sink=sink)
            await done
        except ENGINE_ERRORS as exc:
            raise generation.refusal(exc) from exc
        finally:
            if rid is not None and (done.cancelled() or done.exception() is not None):
                self.engine.drop(rid, abort=True)  # it did not finish: stop it on the engine

    async def _receive_kv(self, source: pb.KvSource, prompt: list[int]) -> tuple[pb.KvReceived, KVTransfer | None]:
        """Fetch the prompt's KV that this worker's prefix cache lacks from the prefill worker ``source`` names.
        A failed transfer is not the request's failure: it is prefilled here instead (``fallback`` says why)."""
        core = self.engine.engine
        tokens = prompt[: source.num_tokens]
        cached = await self.engine.call(lambda: core.cached_prefix_tokens(tokens + [0]))
        start = min(cached, source.num_tokens)
        if self.kv_fetcher is None:
            return pb.KvReceived(fallback="this worker fetches no KV"), None
        fetched = await self.kv_fetcher.fetch(source, start)
        received = pb.KvReceived(
            tokens=source.num_tokens - start if fetched.transfer is not None else 0,
            cached_tokens=start,
            bytes=fetched.bytes,
            seconds=fetched.seconds,
            fallback=fetched.error,
        )
        if fetched.error:
            log.warning("KV transfer %s failed (%s): prefilling here", source.transfer_id, fetched.error)
        if self.metrics is not None:
            self.metrics.kv_received_bytes_total.inc(fetched.bytes)
        return received, fetched.transfer

    async def ReleaseSession(self, request: pb.SessionRequest, context) -> pb.SessionReply:
        core = self.engine.engine
        return pb.SessionReply(found=await self.engine.call(lambda: core.release_session(request.session_id)))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        return pb.AbortReply(found=await self.engine.abort(request.request_id))

    async def Stats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return convert.stats_to_proto(self.engine.stats())

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        if not self.engine.alive:
            return pb.HealthReply(ok=False, detail="engine stopped")
        if self.draining:
            return pb.HealthReply(ok=False, detail="draining")
        if not request.generate:  # steps failing in a row make the engine unhealthy until one succeeds
            problem = self.engine.health()
            return pb.HealthReply(ok=problem is None, detail=problem or "alive")
        start = time.monotonic()
        try:
            # A real one-token generation, ahead of every queued request.
            async for _ in self.engine.generate(self._health_prompt, SamplingParams(max_tokens=1), priority=-(2**31)):
                pass
        except Exception as exc:  # any failure means unhealthy; the reason goes back to the prober
            return pb.HealthReply(ok=False, detail=f"generation failed: {exc}")
        return pb.HealthReply(ok=True, detail="generated one token", latency_s=time.monotonic() - start)

    async def GetTokenizer(self, request: pb.TokenizerRequest, context) -> pb.TokenizerFiles:
        return pb.TokenizerFiles(model=self.model_name, files=self._files, fingerprint=self.fingerprint)


MAX_MESSAGE_BYTES = 64 * 2**20


async def serve_worker(
    engine: AsyncEngine, service: WorkerService, host: str, port: int, credentials: FleetCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server, guarded by ``credentials`` (its secret on every RPC, mutual TLS when it has
    certificates); returns it and the port it bound (``port`` 0 picks a free one)."""
    credentials = credentials or FleetCredentials()
    server = credentials.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    pb_grpc.add_KvTransferServicer_to_server(KvTransferService(engine), server)
    bound = credentials.server_port(server, f"{host}:{port}")
    await server.start()
    return server, bound


async def wait_idle(engine: AsyncEngine, poll_s: float = 0.05) -> None:
    """Return when the engine has nothing running or waiting."""
    while True:
        stats = await engine.call(engine.engine.stats)
        if stats.running == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(poll_s)
