"""`fleetserve probe`: ask a worker whether it serves, over its own gRPC port, for a liveness or readiness check.

With ``--generate`` the worker generates one real token ahead of its queue (what a Kubernetes readiness probe
wants: the model loaded and answering); without it, the worker only says whether its engine runs and its
recent steps succeed (a liveness probe's question, answered without touching the model). The call carries the
fleet secret and TLS material from the FLEETSERVE_* variables, as every call to a worker must.

Exit codes: 0 serving, 1 not serving (the reason on standard error), 2 unreachable or refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials

DESCRIPTION = (
    "Ask a worker over its gRPC port whether it serves: its engine runs and its recent steps succeed, and with "
    "--generate it generates one token ahead of its queue. The call carries the fleet secret and TLS files from "
    "FLEETSERVE_REGISTRATION_TOKEN and FLEETSERVE_TLS_*. Exit code 0: serving; 1: not serving; 2: unreachable "
    "or refused."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:50051", help="the worker's HOST:PORT (default: 127.0.0.1:50051)"
    )
    parser.add_argument("--generate", action="store_true", help="have the worker generate one token")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default: 10)")


async def probe(address: str, generate: bool, timeout: float) -> tuple[int, str]:
    """(exit code, what the worker or the channel said)."""
    credentials = FleetCredentials.from_environment()
    credentials.check()
    async with credentials.channel(address) as channel:
        try:
            reply = await pb_grpc.WorkerStub(channel).Health(pb.HealthRequest(generate=generate), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return 2, f"{address}: {exc.code().name}: {exc.details()}"
    if not reply.ok:
        return 1, f"{address}: not serving: {reply.detail}"
    latency = f" in {1000 * reply.latency_s:.0f} ms" if generate else ""
    return 0, f"{address}: {reply.detail}{latency}"


def run(args: argparse.Namespace) -> int:
    code, said = asyncio.run(probe(args.address, args.generate, args.timeout))
    print(said, file=sys.stderr if code else sys.stdout)
    return code
