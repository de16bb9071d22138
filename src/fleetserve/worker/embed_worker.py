"""A worker of kind "embed": serves a sentence-embedding model over the Worker gRPC service through a dynamic batcher.

Token ids come in (the gateway tokenized the inputs); vectors go back as float32 bytes. Concurrent requests' inputs
share batches (``engine.batcher``): a batch runs when it is full or its oldest input has waited the policy's
delay. Bad input is INVALID_ARGUMENT and fails only its own request; a draining worker is UNAVAILABLE. The
generation RPCs answer FAILED_PRECONDITION, naming what this worker serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from fleetserve.engine.batcher import BatchPolicy, DynamicBatcher
from fleetserve.engine.embedder import Embedder
from fleetserve.engine.torch_threads import run_on_own_thread
from fleetserve.errors import InvalidRequestError
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials
from fleetserve.settings.worker import WorkerSettings
from fleetserve.telemetry.metrics import BatchMetrics, WorkerMetrics
from fleetserve.telemetry.tracing import request_id_var
from fleetserve.text.tokenizer import Tokenizer, tokenizer_files
from fleetserve.worker.agent import WorkerAgent, until_stopped
from fleetserve.worker.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

EMBED_KIND = "embed"
BLOCK_SIZE = 16
"""The token granule the gateway's admission counts this worker's capacity in (it has no KV cache)."""


class EmbedService(pb_grpc.WorkerServicer):
    """Serves one Embedder through one DynamicBatcher."""

    def __init__(self, embedder: Embedder, batcher: DynamicBatcher, model_name: str, tokenizer: Tokenizer) -> None:
        self.embedder = embedder
        self.batcher = batcher
        self.model_name = model_name
        self.fingerprint = tokenizer.fingerprint
        self._probe = tokenizer.encode("", add_special_tokens=True)  # [CLS] [SEP]: the health check's input
        self.draining = False
        self.metrics: WorkerMetrics | None = None
        self._files = tokenizer_files(embedder.model_dir)
        self.in_flight = 0
        """Embed calls being answered."""
        self._latency_s = 0.0  # moving average of a request's time here, for heartbeats

    def stats(self) -> pb.WorkerStats:
        """The load a heartbeat reports: requests here, and inputs queued in the batcher."""
        return pb.WorkerStats(running=self.in_flight, waiting=self.batcher.stats().queued_inputs)

    def recent_latency(self) -> tuple[float, float]:
        return self._latency_s, 0.0

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedReply:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining: send this request elsewhere")
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        request_id_var.set(metadata.get("x-request-id") or request.request_id or uuid.uuid4().hex)
        inputs = [list(i.ids) for i in request.inputs]
        if not inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no inputs to embed")
        try:  # here, so the message numbers the request's inputs, and a bad one never reaches a batch
            self.embedder.check(inputs)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        arrived = time.monotonic()
        self.in_flight += 1
        try:
            ticket = await self.batcher.submit_ticket(self.model_name, inputs)
        except InvalidRequestError as exc:
            self._count("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # this request's batch failed in the model: the gateway may retry elsewhere
            log.exception("embedding failed")
            self._count("error")
            await context.abort(grpc.StatusCode.INTERNAL, f"embedding failed: {exc}")
        finally:
            self.in_flight -= 1
        seconds = time.monotonic() - arrived
        self._latency_s = seconds if not self._latency_s else 0.9 * self._latency_s + 0.1 * seconds
        self._count("ok")
        vectors = np.stack(ticket.results).astype("<f4", copy=False)
        return pb.EmbedReply(
            dimensions=self.embedder.dimensions,
            vectors=vectors.tobytes(),
            prompt_tokens=sum(len(i) for i in inputs),
            queue_s=ticket.waited_s,
            compute_s=ticket.run_s,
            batches=ticket.batches,
        )

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests_total.labels(outcome=outcome).inc()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this worker serves the embedding model {self.model_name!r}: it generates no text",
        )
        yield pb.GenerateChunk()  # unreachable: makes this a generator, as the streaming RPC needs

    async def Stats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return self.stats()

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        if self.draining:
            return pb.HealthReply(ok=False, detail="draining")
        if not request.generate:
            return pb.HealthReply(ok=self.batcher.alive, detail="alive" if self.batcher.alive else "batcher stopped")
        start = time.monotonic()
        try:  # a real embedding of the shortest input, queued like any other
            await self.batcher.submit(self.model_name, [self._probe])
        except Exception as exc:  # any failure means unhealthy; the reason goes back to the prober
            return pb.HealthReply(ok=False, detail=f"embedding failed: {exc}")
        return pb.HealthReply(ok=True, detail="embedded one input", latency_s=time.monotonic() - start)

    async def GetTokenizer(self, request: pb.TokenizerRequest, context) -> pb.TokenizerFiles:
        return pb.TokenizerFiles(model=self.model_name, files=self._files, fingerprint=self.fingerprint)


def batch_policy(opts: WorkerSettings) -> BatchPolicy:
    """The batcher's policy from the worker's settings."""
    return BatchPolicy(
        max_batch_size=opts.max_batch_size,
        max_queue_delay_s=opts.max_queue_delay_ms / 1000.0,
        preferred_batch_sizes=tuple(opts.preferred_batch_sizes),
        max_batch_tokens=opts.max_batch_tokens,
        adaptive_delay=opts.adaptive_queue_delay,
    )


def embed_worker_info(opts: WorkerSettings, embedder: Embedder, fingerprint: str, name: str, address: str):
    """What an embedding worker tells the gateway when it registers: its kind, input limit and vector size. Its
    capacity in admission's terms: ``max_num_seqs`` requests at once, each up to a batch of its longest inputs."""
    tokens = opts.max_num_seqs * opts.max_batch_size * embedder.max_input_tokens
    return pb.WorkerInfo(
        name=name,
        address=address,
        model=opts.served_name,
        role="replica",
        kv_blocks_total=max(1, tokens // BLOCK_SIZE),
        block_size=BLOCK_SIZE,
        device="cpu",
        max_model_len=embedder.max_input_tokens,
        tokenizer_fingerprint=fingerprint,
        model_version=embedder.model_dir.name,
        max_num_seqs=opts.max_num_seqs,
        architecture=embedder.architecture,
        dtype="float32",
        kind=EMBED_KIND,
        embedding_dimensions=embedder.dimensions,
    )


async def run_embed_worker(
    opts: WorkerSettings, model_dir: Path, stop: asyncio.Event, credentials: FleetCredentials
) -> int:
    """Serve the embedding model in ``model_dir`` until ``stop``; then drain, deregister and return an exit code."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    embedder = await run_on_own_thread(lambda: Embedder.load(model_dir))
    tokenizer = Tokenizer.from_dir(model_dir)
    metrics = WorkerMetrics(None) if opts.metrics_port is not None else None
    batch_metrics = BatchMetrics(metrics.registry) if metrics is not None else None

    def run(inputs: list[list[int]]) -> list[np.ndarray]:  # on the batcher's thread
        return list(embedder.embed(inputs).numpy())

    batcher = DynamicBatcher(
        run, batch_policy(opts), on_batch=batch_metrics.observe if batch_metrics is not None else None
    )
    service = EmbedService(embedder, batcher, opts.served_name, tokenizer)
    service.metrics = metrics
    server, port = await _serve(service, opts, credentials)
    metrics_note = ""
    if metrics is not None:
        _, metrics_port = metrics.serve(opts.host, opts.metrics_port)
        metrics_note = f", metrics http://{opts.host}:{metrics_port}/metrics"
    address, name = opts.identity(port)
    info = embed_worker_info(opts, embedder, tokenizer.fingerprint, name, address)
    agents = [
        WorkerAgent(
            gateway,
            info,
            stats=service.stats,
            credentials=credentials,
            on_drain=lambda: setattr(service, "draining", True),
            latency=service.recent_latency,
            on_stop=stop.set,
            heartbeat_relay=opts.heartbeat_relay,
        )
        for gateway in opts.gateways
    ]
    agent_tasks = {asyncio.create_task(agent.run()) for agent in agents}
    print(
        f"fleetserve worker ready: {name} at {address}, model {opts.served_name} (embeddings, "
        f"{embedder.dimensions} dimensions){metrics_note}",
        flush=True,
    )
    code = await until_stopped(stop, agent_tasks)
    await _drain(service, agents, agent_tasks, opts.drain_timeout)
    await server.stop(grace=1.0)
    await batcher.close()
    if metrics is not None:
        metrics.close()
    return code


async def _serve(
    service: EmbedService, opts: WorkerSettings, credentials: FleetCredentials
) -> tuple[grpc.aio.Server, int]:
    """The Worker service's gRPC server, started; and the port it bound."""
    server = credentials.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = credentials.server_port(server, f"{opts.host}:{opts.port}")
    await server.start()
    return server, port


async def _drain(
    service: EmbedService, agents: list[WorkerAgent], agent_tasks: set[asyncio.Task], timeout_s: float
) -> None:
    """Take no new requests, finish the ones here (for at most ``timeout_s``), then leave every gateway."""
    service.draining = True
    for agent in agents:
        agent.draining = True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_idle(service), timeout_s)
    for task in agent_tasks:
        task.cancel()
    await asyncio.gather(*agent_tasks, return_exceptions=True)
    await asyncio.gather(*(agent.deregister() for agent in agents), return_exceptions=True)
    await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)


async def _idle(service: EmbedService, poll_s: float = 0.05) -> None:
    while service.in_flight:
        await asyncio.sleep(poll_s)
