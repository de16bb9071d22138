"""`fleetserve gateway`: the HTTP API (uvicorn) and the Control gRPC service, on one event loop.

The Control service and the channels to workers carry the fleet's credentials (``protocol.security``); a gateway
whose control service would listen beyond loopback without a fleet secret refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import uvicorn

from fleetserve.errors import InvalidRequestError, UnknownModelError
from fleetserve.gateway.admission import Admission
from fleetserve.gateway.app import GatewayState, create_app
from fleetserve.gateway.autoscaler import Autoscaler
from fleetserve.gateway.cache import AnswerCache, make_cache
from fleetserve.gateway.control import ControlService
from fleetserve.gateway.controller import DEFAULT_MEMORY_MB, DeploymentController, Sizing
from fleetserve.gateway.dispatch import Dispatcher, RetryPolicy
from fleetserve.gateway.job_store import make_job_store
from fleetserve.gateway.launcher import Launcher, worker_sizing
from fleetserve.gateway.model_policies import ModelPolicies
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.nodes import NodeTable
from fleetserve.gateway.pipelines import PipelineController
from fleetserve.gateway.policies import make_policy
from fleetserve.gateway.preprocess import Preprocessor, PreprocessPool
from fleetserve.gateway.registry import STAGE_ROLE, WorkerRegistry, connector, probe_generation
from fleetserve.gateway.registry_store import RegistryStore
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials, is_loopback, parse_networks
from fleetserve.settings.base import dial_host
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.telemetry.metrics import DisabledGatewayMetrics, GatewayMetrics
from fleetserve.telemetry.tracing import TraceStore

log = logging.getLogger(__name__)


async def _sweep(registry: WorkerRegistry, admission: Admission) -> None:
    """Age heartbeats, and place queued requests where heartbeats reported room."""
    while True:
        await asyncio.sleep(registry.heartbeat_interval_s / 2)
        registry.sweep()
        admission.pump()


async def _reconcile(deployments: DeploymentController, autoscaler: Autoscaler, interval_s: float) -> None:
    """Notice lost nodes, scale the autoscaled deployments, and bring the nodes' plans in line with the
    deployments, every interval."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            deployments.nodes.sweep()
            autoscaler.tick()
            deployments.reconcile()
        except Exception:  # a bug in one pass must not end reconciling for good
            log.exception("reconciling the deployments failed; trying again in %gs", interval_s)


def _sizing() -> Callable[[str, str, int, str], Sizing]:
    """(model, device, memory_mb, role) -> one worker's memory and KV cache, sized from the model's files where this
    machine has them (remembered), else the memory given (or a default) and the worker's own KV default."""
    plans: dict[tuple[str, str, int, str], Sizing] = {}

    def sizing(model: str, device: str, memory_mb: int, role: str) -> Sizing:
        key = (model, device, memory_mb, role)
        if key not in plans:
            try:
                plans[key] = Sizing(*worker_sizing(model, device, memory_mb, role))
            except InvalidRequestError:  # a memory share too small for the model: the caller's mistake
                raise
            except (UnknownModelError, OSError, ValueError) as exc:  # this machine cannot read the model
                log.info(
                    "cannot size %s here (%s): giving its workers %s MiB", model, exc, memory_mb or DEFAULT_MEMORY_MB
                )
                plans[key] = Sizing(memory_mb or DEFAULT_MEMORY_MB, 0)
        return plans[key]

    return sizing


async def _probe(registry: WorkerRegistry, pipelines: PipelineController) -> None:
    """Actively probe suspect workers with a real one-token generation (a stage node that is no pipeline's head
    cannot generate: it need only answer)."""

    async def one(record) -> None:
        if record.stub is None:  # one with no connection is being removed
            return
        if record.info.role == STAGE_ROLE and not record.serving:
            registry.probe_result(record, await pipelines.answers(record), "the stage node did not answer")
        else:
            registry.probe_result(record, *await probe_generation(record, registry.heartbeat_timeout_s))

    while True:
        await asyncio.sleep(registry.heartbeat_interval_s)
        suspects = registry.suspects()
        if suspects:
            await asyncio.gather(*(one(r) for r in suspects))


def _listen(host: str, port: int, send_buffer: int) -> socket.socket:
    """The HTTP listening socket; accepted connections inherit its fixed send buffer size.

    It is made with its protocol named (IPPROTO_TCP): asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    sockets that say they are TCP, and an accepted socket says what its listener said. With Nagle on, a token's
    small write waited for the client's ACK of the previous one, which a client on a kept-alive connection
    delays by up to 40 ms: every streamed response after a connection's first lost that much before its first
    token (docs/benchmarks.md)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if send_buffer > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def model_registry(settings: GatewaySettings) -> ModelRegistry:
    """The model registry from the settings' ``models`` (a file or a mapping); a wrong policy name or option of
    any model, or of ``policy``, stops the gateway at start-up, not at its first request."""
    try:
        source = settings.models
        if source is None:
            registry = ModelRegistry()
        else:
            registry = ModelRegistry.load(source) if isinstance(source, str) else ModelRegistry.from_config(source)
        for name in registry.names():
            policy, options = registry.policy_for(name)
            try:
                make_policy(policy, **options)
            except ValueError as exc:
                raise ValueError(f"model {name!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"bad model configuration: {exc}", "models") from None
    if settings.policy is not None:
        try:
            make_policy(settings.policy)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "policy") from None
    return registry


@dataclass
class Gateway:
    """The gateway's parts that need starting and closing, around the routes' shared state."""

    state: GatewayState
    admission: Admission
    store: RegistryStore | None
    grpc_server: grpc.aio.Server
    control_port: int
    pipelines: PipelineController
    autoscaler: Autoscaler

    async def close(self) -> None:
        await self.grpc_server.stop(grace=1.0)
        state = self.state
        await self.pipelines.close()
        if state.preprocess.pool is not None:
            await state.preprocess.pool.close()
        for record in list(state.registry.workers.values()):
            if record.channel is not None:
                await record.channel.close()
        if self.store is not None:
            self.store.close()
        if state.answers is not None:
            state.answers.backend.close()
        await state.jobs.close()
        state.traces.shutdown()
        if state.launcher is not None:
            await state.launcher.close()


def check_exposure(settings: GatewaySettings) -> None:
    """Refuse a control service that listens beyond this machine without a fleet secret."""
    if settings.registration_token or is_loopback(settings.control_host):
        return
    raise InvalidRequestError(
        f"the control service would listen on {settings.control_host}, beyond loopback, without a fleet secret: "
        "anyone who reaches it could register workers. Set one with --registration-token or "
        "FLEETSERVE_REGISTRATION_TOKEN (and give the same to every worker), or listen on 127.0.0.1",
        "registration_token",
    )


async def build_gateway(settings: GatewaySettings) -> Gateway:
    """Registry, routing, admission and the Control service (listening), ready for the HTTP app."""
    check_exposure(settings)
    credentials = FleetCredentials.from_settings(settings)
    networks = parse_networks(settings.worker_networks)
    models = model_registry(settings)
    store = RegistryStore(settings.state_db) if settings.state_db else None
    registry = WorkerRegistry(
        settings.heartbeat_interval,
        settings.heartbeat_timeout,
        failure_threshold=settings.failure_threshold,
        dead_retention_s=settings.dead_retention,
        store=store,
        connect=connector(credentials),
    )
    if store is not None:
        for saved in store.load_models():
            if models.get(saved["name"]) is None:
                models.restore(saved)
    tokenizers = TokenizerStore()
    policies = ModelPolicies(models, settings.policy)
    admission = Admission(
        registry,
        policies.policy,
        max_queue=settings.max_queue,
        output_reserve_tokens=settings.output_reserve_tokens,
        queue_timeout_s=settings.queue_timeout,
    )
    registry.on_dead.append(lambda record: policies.forget(record.worker_id))
    metrics = GatewayMetrics() if settings.telemetry else DisabledGatewayMetrics()
    dispatcher = Dispatcher(registry, policies, admission, RetryPolicy(max_retries=settings.max_retries), metrics)
    pipelines = PipelineController(registry, settings.pipeline_cooldown, settings.pipeline_depth, metrics=metrics)
    pipelines.on_change.append(admission.pump)  # a new pipeline head takes the requests queued for its model
    admission.coming = pipelines.assembling
    pipelines.overrides = lambda model: spec.pipeline if (spec := models.get(model)) is not None else {}

    async def on_register(record) -> None:
        stage = record.info.role == STAGE_ROLE
        if stage:
            await pipelines.admit(record)  # ValueError refuses it
        spec = models.learn(record.info)
        if store is not None:
            store.save_model(spec.to_json())
        if stage:
            pipelines.replan(record.info.model, f"{record.name} joined")
        admission.pump(record.info.model)

    deployments = _deployments(settings, models, registry, store, admission, metrics)
    control = ControlService(
        registry,
        on_register=on_register,
        networks=networks,
        prepare=tokenizers.on_register,
        on_stage_report=pipelines.on_stage_report,
        nodes=deployments.nodes,
    )
    grpc_server = credentials.server()
    pb_grpc.add_ControlServicer_to_server(control, grpc_server)
    control_port = credentials.server_port(grpc_server, f"{settings.control_host}:{settings.control_port}")
    await grpc_server.start()
    preprocess = None
    if settings.preprocess_workers > 0:
        preprocess = PreprocessPool(settings.preprocess_workers)
        await preprocess.start()
    state = GatewayState(
        registry=registry,
        tokenizers=tokenizers,
        dispatcher=dispatcher,
        settings=settings,
        models=models,
        answers=_answer_cache(settings, metrics),
        jobs=make_job_store(settings.job_store, settings.job_lease),
        preprocess=Preprocessor(tokenizers, preprocess),
        traces=TraceStore(capacity=1000 if settings.telemetry else 0, exporter=_exporter(settings)),
        control=control,
        pipelines=pipelines,
        deployments=deployments,
        launcher=Launcher(f"{dial_host(settings.control_host)}:{control_port}", credentials, settings.launch_threads),
    )
    return Gateway(state, admission, store, grpc_server, control_port, pipelines, deployments.autoscaler)


def _deployments(
    settings: GatewaySettings,
    models: ModelRegistry,
    registry: WorkerRegistry,
    store: RegistryStore | None,
    admission: Admission | None = None,
    metrics: GatewayMetrics | None = None,
) -> DeploymentController:
    """The node table and the deployment controller (with its autoscaler, given the admission queues and the
    metrics), with the model config's deployments (a bad one stops the gateway at start-up) and, with a state db,
    each change kept there."""
    nodes = NodeTable(lost_after_s=max(10.0, 2 * settings.heartbeat_timeout))
    deployments = DeploymentController(nodes, registry, _sizing())
    if admission is not None and metrics is not None:
        deployments.autoscaler = Autoscaler(deployments, admission, metrics)
    nodes.on_change.append(deployments.reconcile)
    for spec in models:
        for shape in spec.deployment:
            deployments.set(spec.name, shape)
    if store is not None:
        deployments.on_change.append(lambda d: _store_deployment(models, store, d))
    return deployments


def _store_deployment(models: ModelRegistry, store: RegistryStore, deployment) -> None:
    """Keep a model's deployments with its other settings in the state db, so a restarted gateway has them."""
    spec = models.get(deployment.model) or models.learn(pb.WorkerInfo(model=deployment.model))
    spec.deployment = [d for d in spec.deployment if d.get("role", "replica") != deployment.role]
    if deployment.replicas or deployment.max_replicas:
        spec.deployment.append({k: v for k, v in deployment.to_json().items() if k != "model"})
    store.save_model(spec.to_json())


def _answer_cache(settings: GatewaySettings, metrics) -> AnswerCache | None:
    if not settings.response_cache:
        return None
    backend = make_cache(
        settings.response_cache,
        max_entries=settings.response_cache_entries,
        max_bytes=settings.response_cache_mb * 2**20,
    )
    return AnswerCache(backend, metrics, settings.response_cache_ttl or None)


def _exporter(settings: GatewaySettings):
    if not settings.otlp_endpoint:
        return None
    from fleetserve.telemetry.otel import OtelExporter

    return OtelExporter(settings.otlp_endpoint)


GIL_SWITCH_INTERVAL_S = 0.0005
"""How long the event loop's thread waits, at most, for the GIL another thread holds (gRPC's poller, thread-pool
work) before taking it back: Python's default, 5 ms, was the p99 of a routing decision in a loaded gateway with
1,000 workers (docs/benchmarks.md); at 0.5 ms the p99 is under 0.5 ms."""


async def run_gateway(settings: GatewaySettings) -> int:
    """Serve until SIGINT/SIGTERM."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gateway = await build_gateway(settings)
    state = gateway.state
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="on",
            ssl_certfile=settings.http_tls_cert or None,
            ssl_keyfile=settings.http_tls_key or None,
        )
    )
    listener = _listen(settings.host, settings.port, settings.stream_buffer_kb * 1024)
    tasks = [
        asyncio.create_task(_sweep(state.registry, gateway.admission)),
        asyncio.create_task(_probe(state.registry, gateway.pipelines)),
        asyncio.create_task(_reconcile(state.deployments, gateway.autoscaler, settings.heartbeat_interval)),
        asyncio.create_task(_announce(server, settings, gateway.control_port)),
    ]
    try:
        await server.serve(sockets=[listener])
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.close()
    return 0


async def _announce(server: uvicorn.Server, settings: GatewaySettings, control_port: int) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
    scheme = "https" if settings.http_tls_cert else "http"
    print(
        f"fleetserve gateway ready: {scheme}://{settings.host}:{port} (control {settings.control_host}:{control_port})",
        flush=True,
    )
