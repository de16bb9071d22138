"""The direct side of the HTTP benchmark: token ids straight to one worker's gRPC service, timed per request.

A worker of a fleet with a secret (or mutual TLS) needs it too: the client takes the fleet's credentials, by
default from the FLEETSERVE_REGISTRATION_TOKEN and FLEETSERVE_TLS_* variables the fleet's processes read.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetserve.bench.errors import BenchError
from fleetserve.bench.traces import StreamTrace
from fleetserve.bench.workload import WARM_UP_TEXT

if TYPE_CHECKING:
    from fleetserve.protocol import fleet_pb2 as pb
    from fleetserve.protocol.security import FleetCredentials
    from fleetserve.text.tokenizer import Tokenizer

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]


class WorkerClient:
    """Token ids straight to one worker's Worker service over grpc.aio, tokenized here with its own tokenizer."""

    def __init__(self, address: str, max_tokens: int, credentials: FleetCredentials | None = None):
        from fleetserve.contract import SamplingParams
        from fleetserve.protocol import convert
        from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
        from fleetserve.protocol.security import FleetCredentials

        self.address = address
        self.channel = (credentials or FleetCredentials.from_environment()).channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.WorkerStub(self.channel)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True).validate()
        self.params = convert.sampling_to_proto(params)
        self.model = ""
        self.fingerprint = ""
        self._run = uuid.uuid4().hex[:12]

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self.channel.close()

    async def fetch_tokenizer(self) -> Tokenizer:
        """The worker's tokenizer: its files from GetTokenizer, written to a temporary folder and loaded."""
        import grpc

        from fleetserve.protocol import fleet_pb2 as pb
        from fleetserve.text.tokenizer import Tokenizer

        try:
            files = await self.stub.GetTokenizer(pb.TokenizerRequest(), timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(
                f"GetTokenizer on worker {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        self.model, self.fingerprint = files.model, files.fingerprint
        with tempfile.TemporaryDirectory(prefix="fleetserve-bench-tokenizer-") as folder:
            for name, data in files.files.items():
                if "/" in name or "\\" in name or name.startswith("."):
                    raise BenchError(f"worker {self.address} sent a tokenizer file with a bad name: {name!r}")
                (Path(folder) / name).write_bytes(data)
            return Tokenizer.from_dir(folder)  # reads every file now: the folder can go

    def _request(self, request_id: str, prompt: list[int], params: pb.SamplingParams | None = None):
        """A GenerateRequest, with the benchmark's sampling parameters unless told otherwise."""
        from fleetserve.protocol import fleet_pb2 as pb

        return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params or self.params)

    async def warm_up(self, tokenizer: Tokenizer) -> None:
        """One short plain-text generation; raise BenchError if the worker refuses it."""
        import grpc

        from fleetserve.contract import SamplingParams
        from fleetserve.protocol import convert

        params = convert.sampling_to_proto(SamplingParams(max_tokens=2))
        request = self._request(f"bench-{self._run}-warm-up", tokenizer.encode(WARM_UP_TEXT), params)
        try:
            async for _ in self.stub.Generate(request, timeout=120):
                pass
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"warm-up on worker {self.address} failed: {exc.code().name}: {exc.details()}") from exc

    async def stats(self) -> dict[str, int] | None:
        """The worker's counters (None if Stats fails)."""
        import grpc

        from fleetserve.protocol import fleet_pb2 as pb

        try:
            s = await self.stub.Stats(pb.StatsRequest(), timeout=30)
        except grpc.aio.AioRpcError:
            return None
        return {
            "steps": s.steps,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
        }

    async def send(self, prompt: list[int], trace: StreamTrace, timeout: float) -> None:
        """Stream one Generate call and record its timings in ``trace``."""
        import grpc

        request = self._request(f"bench-{self._run}-{trace.request_id}", prompt)
        finish = ""
        trace.prompt_tokens = len(prompt)
        trace.arrival = time.perf_counter()
        call = self.stub.Generate(request, timeout=timeout)
        try:
            async for chunk in call:
                now = time.perf_counter()
                if chunk.token_ids:
                    if trace.first_token is None:
                        trace.first_token = now
                    trace.token_times.append(now)
                trace.output_tokens = chunk.num_output_tokens
                trace.prompt_tokens = chunk.num_prompt_tokens or trace.prompt_tokens
                trace.cached_tokens = chunk.num_cached_tokens
                finish = chunk.finish_reason or finish
        except grpc.aio.AioRpcError as exc:
            trace.fail(f"gRPC {exc.code().name}: {exc.details()}")
            return
        finally:
            call.cancel()  # no-op once the call is done
        trace.finish_time = time.perf_counter()
        if finish in ("stop", "length"):
            trace.finish_reason = finish
        else:
            trace.fail(f"gRPC OK, but the stream ended with finish_reason {finish!r}")


def stats_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, Any] | None:
    """The worker's counters over one side's run, and its prefix cache hit rate."""
    if before is None or after is None:
        return None
    delta: dict[str, Any] = {key: after[key] - before[key] for key in after}
    queries = delta["prefix_cache_queries"]
    delta["prefix_cache_hit_rate"] = delta["prefix_cache_hits"] / queries if queries else 0.0
    return delta
