"""`fleetserve worker`: load a model, serve it over gRPC, register with a gateway, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.engine.engine import LLMEngine
from fleetserve.engine.kv_pins import SESSION
from fleetserve.engine.torch_threads import run_on_own_thread
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files import model_kind, prepare_model_dir
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol.security import FleetCredentials
from fleetserve.settings.worker import WorkerSettings
from fleetserve.telemetry.metrics import WorkerMetrics
from fleetserve.text.tokenizer import Tokenizer
from fleetserve.worker.agent import WorkerAgent, until_stopped
from fleetserve.worker.kv_transfer import KvFetcher
from fleetserve.worker.server import WorkerService, serve_worker, wait_idle

log = logging.getLogger(__name__)


def worker_info(opts: WorkerSettings, engine: AsyncEngine, fingerprint: str, name: str, address: str) -> pb.WorkerInfo:
    """What this worker tells the gateway when it registers."""
    core = engine.engine
    model = engine.engine.config.model
    return pb.WorkerInfo(
        name=name,
        address=address,
        model=opts.served_name,
        role=opts.role,
        layer_start=model.layer_start,
        layer_end=model.layer_end or core.arch.num_layers,
        kv_blocks_total=core.kv.num_blocks,
        block_size=core.kv.block_size,
        device=str(core.runner.device),
        memory_cap_bytes=core.runner.kv_cache_bytes,
        max_model_len=core.max_model_len,
        tokenizer_fingerprint=fingerprint,
        model_version=core.model_dir.name,
        max_num_seqs=opts.max_num_seqs,
        architecture=core.arch.architecture,
        dtype=core.runner.weight_format.name,  # the weights' form: float32, bfloat16, float16 or int4
        num_layers=core.arch.num_layers,
        kind="generate",
    )


def pinned_sessions(core: LLMEngine) -> list[pb.PinnedSession]:
    """The sessions whose KV the engine keeps pinned, for the heartbeat (on the engine thread)."""
    return [
        pb.PinnedSession(session_id=p.key, tokens=p.tokens, blocks=p.blocks, idle_s=p.idle_s, ttl_left_s=p.ttl_left_s)
        for p in core.pinned()
        if p.kind == SESSION
    ]


async def run_worker(opts: WorkerSettings, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); then drain, deregister and return an exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    credentials = FleetCredentials.from_settings(opts)  # a bad TLS setting stops the worker before the model loads
    if opts.role == "stage":
        from fleetserve.worker.stage_node import run_stage_node

        return await run_stage_node(opts, stop, credentials)

    model_dir = await run_on_own_thread(lambda: prepare_model_dir(opts.model, progress=sys.stderr.isatty()))
    if model_kind(model_dir) == "embed":
        return await _serve_embeddings(opts, model_dir, stop, credentials)

    engine = await AsyncEngine.create(opts.engine_config(), progress=sys.stderr.isatty(), **opts.stream_options())
    core = engine.engine
    tokenizer = Tokenizer.from_dir(core.model_dir)
    service = WorkerService(engine, opts.served_name, tokenizer.fingerprint)
    service.kv_fetcher = KvFetcher(credentials, opts.kv_fetch_timeout)
    server, port = await serve_worker(engine, service, opts.host, opts.port, credentials)
    metrics_note = ""
    if opts.metrics_port is not None:
        service.metrics = WorkerMetrics(engine.stats)
        _, metrics_port = service.metrics.serve(opts.host, opts.metrics_port)
        metrics_note = f", metrics http://{opts.host}:{metrics_port}/metrics"
    address, name = opts.identity(port)
    info = worker_info(opts, engine, tokenizer.fingerprint, name, address)
    # One agent per gateway: each registers, heartbeats and takes commands on its own; gateways that share the
    # worker see its whole load in every heartbeat. A drain or stop from any one of them applies to the worker.
    agents = [
        WorkerAgent(
            gateway,
            info,
            stats=lambda: convert.stats_to_proto(engine.stats()),
            credentials=credentials,
            on_drain=lambda: setattr(service, "draining", True),
            latency=service.recent_latency,
            block_hashes=lambda: engine.call(core.kv.cached_hashes),
            on_stop=stop.set,
            sessions=lambda: engine.call(lambda: pinned_sessions(core)),
            heartbeat_relay=opts.heartbeat_relay,
        )
        for gateway in opts.gateways
    ]
    agent_tasks = {asyncio.create_task(agent.run()) for agent in agents}
    print(f"fleetserve worker ready: {name} at {address}, model {opts.served_name}{metrics_note}", flush=True)

    code = await until_stopped(stop, agent_tasks)
    # Drain: take no new requests, finish the ones we have, then leave.
    service.draining = True
    for agent in agents:
        agent.draining = True
    stats = engine.stats()
    _say(f"fleetserve worker: draining {name} ({stats.running + stats.waiting} request(s) to finish)")
    try:
        await asyncio.wait_for(wait_idle(engine), opts.drain_timeout)
        _say(f"fleetserve worker: {name} drained")
    except asyncio.TimeoutError:
        log.warning("drain timed out after %.0fs; stopping with requests still running", opts.drain_timeout)
    for task in agent_tasks:
        task.cancel()
    await asyncio.gather(*agent_tasks, return_exceptions=True)
    await asyncio.gather(*(agent.deregister() for agent in agents), return_exceptions=True)
    await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
    await server.stop(grace=1.0)
    await service.kv_fetcher.close()
    if service.metrics is not None:
        service.metrics.close()
    await engine.close()
    return code


async def _serve_embeddings(
    opts: WorkerSettings, model_dir: Path, stop: asyncio.Event, credentials: FleetCredentials
) -> int:
    """Serve an embedding model (``worker.embed_worker``): whole, as a replica."""
    if opts.role != "replica":
        raise InvalidRequestError(f"an embedding model is served whole: --role {opts.role} is for LLMs", "role")
    from fleetserve.worker.embed_worker import run_embed_worker

    return await run_embed_worker(opts, model_dir, stop, credentials)


def _say(line: str) -> None:
    """A line on standard output, if it is still there (a supervisor that died takes the pipe with it)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)
