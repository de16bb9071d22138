"""`fleetserve gateway`: the HTTP API (uvicorn) and the Control gRPC service, on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

import grpc
import uvicorn

from fleetserve.gateway.admission import Admission
from fleetserve.gateway.answer_cache import AnswerCache
from fleetserve.gateway.app import GatewayState, create_app
from fleetserve.gateway.balancer import Balancer
from fleetserve.gateway.control import ControlService
from fleetserve.gateway.dispatch import Dispatcher, RetryPolicy
from fleetserve.gateway.launcher import Launcher
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.preprocess import PreprocessPool
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.gateway.registry_store import RegistryStore
from fleetserve.gateway.response_cache import make_cache
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.telemetry.metrics import DisabledGatewayMetrics, GatewayMetrics
from fleetserve.telemetry.tracing import TraceStore

log = logging.getLogger(__name__)


@dataclass
class GatewayOptions:
    """Where the gateway listens and who may use it."""

    host: str = "127.0.0.1"
    port: int = 8000
    control_host: str = "127.0.0.1"
    control_port: int = 50050
    api_keys: list[str] = field(default_factory=list)
    """Empty: no authentication. Otherwise every route but /health needs `Authorization: Bearer KEY`."""
    registration_token: str = ""
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    default_max_tokens: int = 1024
    """max_tokens when a request gives none (capped by what the context window leaves)."""
    preprocess_workers: int = 0
    """Helper processes for chat templating and tokenization; 0 does it on the event loop."""
    policy: str | None = None
    """Balancing policy for models the model config does not give one (None: prefix-aware)."""
    models: ModelRegistry = field(default_factory=ModelRegistry)
    state_db: str = ""
    """SQLite file for the registry's durable part; empty keeps it in memory only."""
    failure_threshold: int = 3
    """Failed requests in a row that make a worker suspect, and failed probes that make a suspect dead."""
    dead_retention_s: float = 300.0
    max_retries: int = 3
    max_queue: int = 256
    """Requests per model that may wait for room; beyond it, 503 at once."""
    queue_timeout_s: float = 300.0
    output_reserve_tokens: int = 256
    slow_client_timeout_s: float = 30.0
    """A streaming client that reads nothing for this long is cut off and its request aborted (0: never)."""
    response_cache: str = ""
    """Where deterministic answers are cached: "" off, "memory", an SQLite file (".sqlite"/".db" or
    "sqlite:///path": kept across restarts) or "redis://HOST:PORT/DB" (shared by several gateways)."""
    response_cache_entries: int = 10000
    response_cache_mb: int = 256
    response_cache_ttl_s: float = 0.0
    """0: entries live until evicted."""
    otlp_endpoint: str = ""
    """OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces): finished traces are exported there
    (needs the `otel` extra); empty: no export."""
    admin_key: str = ""
    """When set, /admin needs this bearer key (API keys do not open it)."""
    launch_threads: int | None = None
    """torch threads of workers joined through the admin API (None: half the cores)."""
    telemetry: bool = True
    """False: no metrics recorded and no traces kept (to measure what they cost)."""
    stream_buffer_bytes: int = 256 * 1024
    """Kernel send buffer per client connection (fixed, not auto-tuned): with the server's own write buffer it
    bounds what a client that stops reading can hold up before sends wait (0: the kernel's default)."""


async def _sweep(registry: WorkerRegistry, admission: Admission) -> None:
    """Age heartbeats, and place queued requests where heartbeats reported room."""
    while True:
        await asyncio.sleep(registry.heartbeat_interval_s / 2)
        registry.sweep()
        admission.pump()


async def _probe(registry: WorkerRegistry) -> None:
    """Actively probe suspect workers with a real one-token generation."""

    async def one(record) -> None:
        stub = record.stub
        if stub is None:
            return
        try:
            reply = await stub.Health(pb.HealthRequest(generate=True), timeout=registry.heartbeat_timeout_s)
            registry.probe_result(record, reply.ok, reply.detail)
        except grpc.aio.AioRpcError as exc:
            registry.probe_result(record, False, f"{exc.code().name}: {exc.details()}")

    while True:
        await asyncio.sleep(registry.heartbeat_interval_s)
        suspects = registry.suspects()
        if suspects:
            await asyncio.gather(*(one(r) for r in suspects))


def _listen(host: str, port: int, send_buffer: int) -> socket.socket:
    """The HTTP listening socket; accepted connections inherit its fixed send buffer size."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _dial(host: str) -> str:
    """An address local workers can dial for a listening host (a wildcard listens on loopback too)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


async def run_gateway(opts: GatewayOptions) -> int:
    """Serve until SIGINT/SIGTERM."""
    store = RegistryStore(opts.state_db) if opts.state_db else None
    registry = WorkerRegistry(
        opts.heartbeat_interval_s,
        opts.heartbeat_timeout_s,
        failure_threshold=opts.failure_threshold,
        dead_retention_s=opts.dead_retention_s,
        store=store,
    )
    models = opts.models
    if store is not None:
        for saved in store.load_models():
            if models.get(saved["name"]) is None:
                models.restore(saved)
    tokenizers = TokenizerStore()
    balancer = Balancer(models, opts.policy)
    admission = Admission(
        registry,
        balancer.policy,
        max_queue=opts.max_queue,
        output_reserve_tokens=opts.output_reserve_tokens,
        queue_timeout_s=opts.queue_timeout_s,
    )
    registry.on_dead.append(lambda record: balancer.forget(record.worker_id))
    dispatcher = Dispatcher(
        registry,
        balancer,
        admission,
        RetryPolicy(max_retries=opts.max_retries),
        metrics=GatewayMetrics() if opts.telemetry else DisabledGatewayMetrics(),
    )

    async def on_register(record) -> None:
        await tokenizers.on_register(record)
        spec = models.learn(record.info)
        if store is not None:
            store.save_model(spec.to_json())
        admission.pump(record.info.model)

    control = ControlService(registry, opts.registration_token, on_register=on_register)
    grpc_server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(control, grpc_server)
    control_port = grpc_server.add_insecure_port(f"{opts.control_host}:{opts.control_port}")
    if control_port == 0:
        raise OSError(f"cannot listen on {opts.control_host}:{opts.control_port}")
    await grpc_server.start()
    preprocess = None
    if opts.preprocess_workers > 0:
        preprocess = PreprocessPool(opts.preprocess_workers)
        await preprocess.start()
    exporter = None
    if opts.otlp_endpoint:
        from fleetserve.telemetry.otel import OtelExporter

        exporter = OtelExporter(opts.otlp_endpoint)
    answers = None
    if opts.response_cache:
        backend = make_cache(
            opts.response_cache, max_entries=opts.response_cache_entries, max_bytes=opts.response_cache_mb * 2**20
        )
        answers = AnswerCache(backend, dispatcher.metrics, opts.response_cache_ttl_s or None)
    state = GatewayState(
        registry=registry,
        tokenizers=tokenizers,
        dispatcher=dispatcher,
        options=opts,
        models=models,
        answers=answers,
        preprocess=preprocess,
        traces=TraceStore(capacity=1000 if opts.telemetry else 0, exporter=exporter),
        control=control,
        launcher=Launcher(f"{_dial(opts.control_host)}:{control_port}", opts.registration_token, opts.launch_threads),
    )
    app = create_app(state)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    listener = _listen(opts.host, opts.port, opts.stream_buffer_bytes)
    sweeper = asyncio.create_task(_sweep(registry, admission))
    prober = asyncio.create_task(_probe(registry))

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else opts.port
        print(
            f"fleetserve gateway ready: http://{opts.host}:{port} (control {opts.control_host}:{control_port})",
            flush=True,
        )

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[listener])
    finally:
        for task in (sweeper, prober, announcer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await grpc_server.stop(grace=1.0)
        if preprocess is not None:
            await preprocess.close()
        for record in list(registry.workers.values()):
            if record.channel is not None:
                await record.channel.close()
        if store is not None:
            store.close()
        if answers is not None:
            answers.backend.close()
        if exporter is not None:
            exporter.shutdown()
        await state.launcher.close()
    return 0
