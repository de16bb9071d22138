"""`fleetserve gateway`: the HTTP API (uvicorn) and the Control gRPC service, on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
import uvicorn

from fleetserve.gateway.app import GatewayState, create_app
from fleetserve.gateway.control import ControlService
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.preprocess import PreprocessPool
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc

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


async def _sweep(registry: WorkerRegistry) -> None:
    while True:
        await asyncio.sleep(registry.heartbeat_interval_s / 2)
        for record in registry.sweep():
            log.warning("worker %s (%s) missed heartbeats: removed", record.worker_id, record.info.address)
            if record.channel is not None:
                await record.channel.close()


async def run_gateway(opts: GatewayOptions) -> int:
    """Serve until SIGINT/SIGTERM."""
    registry = WorkerRegistry(opts.heartbeat_interval_s, opts.heartbeat_timeout_s)
    tokenizers = TokenizerStore()
    control = ControlService(registry, opts.registration_token, on_register=tokenizers.on_register)
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
    state = GatewayState(
        registry=registry, tokenizers=tokenizers, dispatcher=Dispatcher(registry), options=opts, preprocess=preprocess
    )
    app = create_app(state)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    sweeper = asyncio.create_task(_sweep(registry))

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
        await server.serve()
    finally:
        for task in (sweeper, announcer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await grpc_server.stop(grace=1.0)
        if preprocess is not None:
            await preprocess.close()
        for record in list(registry.workers.values()):
            if record.channel is not None:
                await record.channel.close()
    return 0
