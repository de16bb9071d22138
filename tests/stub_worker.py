"""A torch-free stand-in for a worker, for tests that look at the gateway alone: it registers with a gateway
like a real worker (the real WorkerAgent), serves the real model's tokenizer files, and answers every
generation with the same few tokens (the scale benchmark's FixedAnswerWorker). It runs no model, so nothing it
does can load torch."""

from __future__ import annotations

import asyncio

import grpc

from fleetserve.bench.sim_workers import FixedAnswerWorker, worker_info
from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials
from fleetserve.worker.agent import WorkerAgent

ANSWER = " stub answer"


async def start_stub_worker(
    gateway: str,
    name: str = "stub",
    credentials: FleetCredentials | None = None,
    model: str = DEFAULT_MODEL,
    max_model_len: int = 2048,
    kv_blocks: int = 64,
    heartbeat_relay: str | None = None,
) -> tuple[grpc.aio.Server, WorkerAgent, asyncio.Task]:
    """Serve a stub worker on a free loopback port and register it with ``gateway`` (with ``credentials``: the
    fleet secret, and mutual TLS when it has certificates) as a worker of ``model`` with the context and KV
    blocks it claims; ``heartbeat_relay``: heartbeat through the relay at that address."""
    credentials = credentials or FleetCredentials()
    model_dir = prepare_model_dir(DEFAULT_MODEL, progress=False)
    service = FixedAnswerWorker(model_dir, DEFAULT_MODEL, ANSWER)
    server = credentials.server()
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = credentials.server_port(server, "127.0.0.1:0")
    await server.start()
    info = worker_info(service, model_dir, name, f"127.0.0.1:{port}", model, max_model_len, kv_blocks)
    stats = pb.WorkerStats(kv_blocks_total=kv_blocks, kv_blocks_free=kv_blocks)
    agent = WorkerAgent(gateway, info, stats=lambda: stats, credentials=credentials, heartbeat_relay=heartbeat_relay)
    return server, agent, asyncio.create_task(agent.run())
