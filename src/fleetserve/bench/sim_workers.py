"""Simulated workers, many to a process, for measuring the gateway at fleet sizes one machine cannot run.

Each simulated worker registers with a real gateway through the real :class:`~fleetserve.worker.agent.WorkerAgent`
(Control gRPC: registration, a heartbeat stream at the gateway's interval carrying load and prefix-cache block
hash deltas, commands) and is served by the real Worker gRPC service, answering every generation with the same
few tokens (:class:`FixedAnswerWorker`). The workers of one process share one gRPC server: each advertises its own
address in 127.0.0.0/8 (every one of which reaches this machine's loopback) on that server's port, so the gateway
sees, dials and keeps a connection to each as to a separate machine. No model runs and torch is never imported.
With ``--per-relay K`` the workers heartbeat through real heartbeat relays (``worker.heartbeat_relay``), one for
every K of them, each with its own server and its own stream to the gateway, as K workers behind one node agent.

    python -m fleetserve.bench.sim_workers --gateway 127.0.0.1:50050 --count 250 --first 0

prints ``sim workers ready: N`` once all N have registered, and runs until SIGTERM/SIGINT (then they deregister).
The fleet secret comes from ``FLEETSERVE_REGISTRATION_TOKEN`` as for every process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
from collections import deque
from pathlib import Path

import grpc

from fleetserve.model_files import DEFAULT_MODEL, load_arch, prepare_model_dir
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import SECRET_ENV, FleetCredentials
from fleetserve.text.tokenizer import Tokenizer, tokenizer_files
from fleetserve.worker.agent import WorkerAgent
from fleetserve.worker.heartbeat_relay import HeartbeatRelay, serve_relay

ANSWER = " simulated answer"


class FixedAnswerWorker(pb_grpc.WorkerServicer):
    """The Worker gRPC service without a model: serves the model's tokenizer files and answers every generation
    with the tokens of ``answer`` (as many as ``max_tokens`` allows)."""

    def __init__(self, model_dir: Path, model: str = DEFAULT_MODEL, answer: str = ANSWER):
        self.model = model
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.files = tokenizer_files(model_dir)
        self.answer = self.tokenizer.encode(answer)

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
        return pb.HealthReply(ok=True, detail="simulated")

    async def GetTokenizer(self, request, context):
        return pb.TokenizerFiles(model=self.model, files=self.files, fingerprint=self.tokenizer.fingerprint)


def worker_info(
    service: FixedAnswerWorker,
    model_dir: Path,
    name: str,
    address: str,
    model: str = DEFAULT_MODEL,
    max_model_len: int = 2048,
    kv_blocks: int = 64,
    max_num_seqs: int = 8,
) -> pb.WorkerInfo:
    """What a simulated worker registers as: a replica of ``model`` holding all of its layers."""
    arch = load_arch(model_dir)
    return pb.WorkerInfo(
        name=name,
        address=address,
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
        max_num_seqs=max_num_seqs,
        architecture=arch.architecture,
        dtype="float32",
        num_layers=arch.num_layers,
    )


class ChurningBlocks:
    """A simulated prefix cache: ``size`` block hashes, of which ``churn`` are replaced by new ones at every
    heartbeat (evicted oldest first), so each heartbeat carries a delta of ``churn`` added and ``churn`` removed."""

    def __init__(self, size: int, churn: int, rng: random.Random):
        self.rng = rng
        self.churn = churn
        self.order = deque(rng.getrandbits(63) for _ in range(size))
        self.current = set(self.order)

    async def __call__(self) -> set[int]:
        for _ in range(self.churn):
            self.current.discard(self.order.popleft())
            fresh = self.rng.getrandbits(63)
            self.order.append(fresh)
            self.current.add(fresh)
        return set(self.current)


def sim_address(index: int, port: int) -> str:
    """Simulated worker ``index``'s own loopback address (127.1.0.1, 127.1.0.2, ... 250 to a /24)."""
    return f"127.1.{index // 250}.{index % 250 + 1}:{port}"


async def serve(args: argparse.Namespace) -> int:
    credentials = FleetCredentials(os.environ.get(SECRET_ENV, ""))
    model_dir = prepare_model_dir(args.model_source, progress=False)
    service = FixedAnswerWorker(model_dir, args.model)
    server = credentials.server()
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = credentials.server_port(server, f"0.0.0.0:{args.port}")
    await server.start()
    rng = random.Random(args.seed + args.first)
    relays: list[tuple[HeartbeatRelay, grpc.aio.Server, str]] = []
    agents = []
    for i in range(args.first, args.first + args.count):
        relay_address = None
        if args.per_relay:
            if (i - args.first) % args.per_relay == 0:
                relay = HeartbeatRelay(args.gateway, credentials, flush_s=args.relay_flush)
                relay_server, relay_port = await serve_relay(relay, "127.0.0.1:0")
                relays.append((relay, relay_server, f"127.0.0.1:{relay_port}"))
            relay_address = relays[-1][2]
        info = worker_info(service, model_dir, f"sim-{i}", sim_address(i, port), args.model, kv_blocks=1024)
        stats = pb.WorkerStats(kv_blocks_total=info.kv_blocks_total, kv_blocks_free=info.kv_blocks_total)
        blocks = ChurningBlocks(args.blocks, args.churn, rng)
        agents.append(
            WorkerAgent(
                args.gateway,
                info,
                stats=lambda s=stats: s,
                credentials=credentials,
                block_hashes=blocks,
                heartbeat_relay=relay_address,
            )
        )
    relay_tasks = [asyncio.create_task(relay.run()) for relay, _, _ in relays]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await asyncio.gather(*(a.registered.wait() for a in agents))
    print(f"sim workers ready: {len(agents)} on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(a.deregister() for a in agents))
    for task in tasks + relay_tasks:
        task.cancel()
    await asyncio.gather(*tasks, *relay_tasks, return_exceptions=True)
    for _, relay_server, _ in relays:
        await relay_server.stop(None)
    await asyncio.gather(*(a.close() for a in agents))
    await server.stop(None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="the gateway's control address HOST:PORT")
    parser.add_argument("--count", type=int, default=100, help="simulated workers in this process")
    parser.add_argument("--first", type=int, default=0, help="index of the first (names sim-N, addresses by index)")
    parser.add_argument("--port", type=int, default=0, help="the shared gRPC server's port (0: a free one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model name they register")
    parser.add_argument("--model-source", default=DEFAULT_MODEL, help="whose tokenizer they serve")
    parser.add_argument("--blocks", type=int, default=256, help="prefix-cache block hashes each reports")
    parser.add_argument("--churn", type=int, default=4, help="of those, replaced at each heartbeat")
    parser.add_argument("--per-relay", type=int, default=0, help="workers per heartbeat relay (0: no relays)")
    parser.add_argument("--relay-flush", type=float, default=1.0, help="a relay's longest wait, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1 or args.first < 0 or args.blocks < args.churn or args.churn < 0 or args.per_relay < 0:
        print("--count must be >= 1, --first >= 0, --per-relay >= 0, 0 <= --churn <= --blocks", file=sys.stderr)
        return 2
    return asyncio.run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
