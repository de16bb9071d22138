"""`fleetserve worker --role stage`: a node that offers its memory for a pipeline's layers and runs what it gets.

It loads no layers until the gateway assigns it a range (Stage.Assign); as a pipeline's head it also serves the
Worker service (Generate and the rest), as any worker does.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from fleetserve.engine.pipeline import PipelineHead
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials
from fleetserve.settings.worker import WorkerSettings
from fleetserve.text.tokenizer import Tokenizer
from fleetserve.worker.agent import WorkerAgent, until_stopped
from fleetserve.worker.server import MAX_MESSAGE_BYTES, wait_idle
from fleetserve.worker.stage_host import StageHost
from fleetserve.worker.stage_service import StageService, StageWorkerService

log = logging.getLogger(__name__)


def stage_info(opts: WorkerSettings, host: StageHost, fingerprint: str, name: str, address: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        name=name,
        address=address,
        model=opts.served_name,
        role="stage",
        block_size=opts.block_size,
        device=str(host.device),
        memory_cap_bytes=host.memory_cap,
        max_model_len=host.max_model_len,
        tokenizer_fingerprint=fingerprint,
        model_version=host.model_dir.name,
        max_num_seqs=opts.max_num_seqs,
        architecture=host.arch.architecture,
        dtype=str(host.dtype).removeprefix("torch."),
        num_layers=host.arch.num_layers,
        stage=host.profile,
    )


def pipeline_report(host: StageHost) -> pb.PipelineReport | None:
    """The head's latest figures for the gateway's metrics and console (None on other stages)."""
    engine = host.engine
    head: PipelineHead | None = engine.engine.pipeline if engine is not None else None
    if head is None:
        return None
    t = head.telemetry
    last = t.hops[-1] if t.hops else []
    n = max(1, t.steps)
    means = [
        pb.StageHop(
            name=h.name,
            layer_start=h.layer_start,
            layer_end=h.layer_end,
            compute_s=t.busy_s.get(h.name, 0.0) / n,
            transfer_s=t.transfer_s.get(h.name, 0.0) / n,
            bytes=t.bytes.get(h.name, 0) // n,
        )
        for h in last
    ]
    return pb.PipelineReport(
        stages=len(last) or 1,
        depth=head.depth,
        bubble=t.bubble(),
        hops=[convert.hop_to_proto(h) for h in last],
        mean_hops=means,
        steps=t.steps,
    )


async def run_stage_node(opts: WorkerSettings, stop: asyncio.Event, credentials: FleetCredentials) -> int:
    """Serve as a stage node until ``stop``; then drain (as a head), deregister and return an exit code."""
    name = opts.name or f"{socket.gethostname()}-stage"
    host = await asyncio.to_thread(StageHost, opts, credentials, name)
    await host.on_compute(host.calibrate)
    tokenizer = await asyncio.to_thread(Tokenizer.from_dir, host.model_dir)
    worker_service = StageWorkerService(host, opts.served_name, tokenizer.fingerprint)
    stage_service = StageService(host)
    server = credentials.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_WorkerServicer_to_server(worker_service, server)
    pb_grpc.add_StageServicer_to_server(stage_service, server)
    port = credentials.server_port(server, f"{opts.host}:{opts.port}")
    await server.start()
    address = opts.advertise or f"{opts.host}:{port}"
    if not opts.name:
        host.name = name = f"{socket.gethostname()}-{port}"
    host.on_head_change = worker_service.set_engine
    agent = None
    tasks: set[asyncio.Task] = set()
    if opts.gateways:  # one at most: the settings refuse a list for a stage node
        agent = WorkerAgent(
            opts.gateways[0],
            stage_info(opts, host, tokenizer.fingerprint, name, address),
            stats=lambda: convert.stats_to_proto(host.engine.stats()) if host.engine else pb.WorkerStats(),
            credentials=credentials,
            on_drain=lambda: worker_service.draining(True),
            on_stop=stop.set,
            pipeline=lambda: pipeline_report(host),
            heartbeat_relay=opts.heartbeat_relay,
        )
        host.on_fault = agent.report_fault
        tasks.add(asyncio.create_task(agent.run()))
    print(
        f"fleetserve worker ready: {name} at {address}, model {opts.served_name}, stage node with "
        f"{host.memory_cap // 2**20} MiB",
        flush=True,
    )
    code = await until_stopped(stop, tasks)
    worker_service.draining(True)
    if agent is not None:
        agent.draining = True
    if host.engine is not None:
        try:
            await asyncio.wait_for(wait_idle(host.engine), opts.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out after %.0fs", opts.drain_timeout)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if agent is not None:
        await agent.deregister()
        await agent.close()
    await host.close()
    await server.stop(grace=1.0)
    return code
