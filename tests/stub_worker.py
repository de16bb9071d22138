"""A torch-free stand-in for a worker, for tests that look at the gateway alone: it registers with a gateway
like a real worker (the real WorkerAgent), serves the real model's tokenizer files, and answers every
generation with the same few tokens. It runs no model, so nothing it does can load torch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from fleetserve.model_files import DEFAULT_MODEL, load_arch, prepare_model_dir
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials
from fleetserve.text.tokenizer import Tokenizer, tokenizer_files
from fleetserve.worker.agent import WorkerAgent

ANSWER = " stub answer"


class StubWorker(pb_grpc.WorkerServicer):
    def __init__(self, model_dir: Path):
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.files = tokenizer_files(model_dir)
        self.answer = self.tokenizer.encode(ANSWER)

    async def Generate(self, request: pb.GenerateRequest, context):
        ids = self.answer[: request.params.max_tokens]
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            yield pb.GenerateChunk(
                token_ids=[token],
                num_output_tokens=i + 1,
                num_prompt_tokens=len(request.prompt_token_ids),
                finish_reason=("length" if len(ids) == request.params.max_tokens else "stop") if last else "",
            )

    async def Abort(self, request, context):
        return pb.AbortReply(found=False)

    async def Stats(self, request, context):
        return pb.WorkerStats(kv_blocks_total=64, kv_blocks_free=64)

    async def Health(self, request, context):
        return pb.HealthReply(ok=True, detail="stub")

    async def GetTokenizer(self, request, context):
        return pb.TokenizerFiles(model=DEFAULT_MODEL, files=self.files, fingerprint=self.tokenizer.fingerprint)


async def start_stub_worker(
    gateway: str,
    name: str = "stub",
    credentials: FleetCredentials | None = None,
    model: str = DEFAULT_MODEL,
    max_model_len: int = 2048,
    kv_blocks: int = 64,
) -> tuple[grpc.aio.Server, WorkerAgent, asyncio.Task]:
    """Serve a StubWorker on a free loopback port and register it with ``gateway`` (with ``credentials``: the
    fleet secret, and mutual TLS when it has certificates) as a worker of ``model`` with the context and KV
    blocks it claims."""
    credentials = credentials or FleetCredentials()
    model_dir = prepare_model_dir(DEFAULT_MODEL, progress=False)
    arch = load_arch(model_dir)
    service = StubWorker(model_dir)
    server = credentials.server()
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = credentials.server_port(server, "127.0.0.1:0")
    await server.start()
    info = pb.WorkerInfo(
        name=name,
        address=f"127.0.0.1:{port}",
        model=model,
        role="replica",
        layer_start=0,
        layer_end=arch.num_layers,
        kv_blocks_total=kv_blocks,
        block_size=16,
        device="cpu",
        max_model_len=max_model_len,
        tokenizer_fingerprint=service.tokenizer.fingerprint,
        model_version=model_dir.name,
        max_num_seqs=8,
        architecture=arch.architecture,
        dtype="float32",
        num_layers=arch.num_layers,
    )
    stats = pb.WorkerStats(kv_blocks_total=kv_blocks, kv_blocks_free=kv_blocks)
    agent = WorkerAgent(gateway, info, stats=lambda: stats, credentials=credentials)
    return server, agent, asyncio.create_task(agent.run())
