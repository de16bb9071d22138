"""KV between workers: a prefill worker's KvTransfer service, and the decode worker's fetch from it.

The prefill worker ran a request with ``prefill_only``: its engine pinned the prompt's KV under the request id.
The decode worker asks for the tokens its own prefix cache lacks (``start``); the service streams them in
chunks of whole tokens, each with a CRC-32 of its bytes, and releases the KV when the stream ends, whether it
was read to the end or not (a transfer is used once; the engine's transfer TTL frees one nobody fetched).
The receiver checks every chunk (order, size, checksum, the header's shape) and assembles one
:class:`KVTransfer` in token order, so neither side's block size matters. Both ends use the fleet's credentials,
like every other link.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from dataclasses import dataclass

import grpc

from fleetserve.contract import KVTransfer
from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.engine.engine import DTYPE_BYTES
from fleetserve.engine.kv_pins import TRANSFER
from fleetserve.engine.torch_threads import run_on_own_thread
from fleetserve.errors import InvalidRequestError
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials
from fleetserve.worker.stage_link import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 2**20
"""About how many bytes one chunk carries when the receiver does not say how many tokens."""
DEADLINE_S = 30.0
"""How long a decode worker waits for a whole transfer by default before it prefills the prompt itself."""


class KvTransferService(pb_grpc.KvTransferServicer):
    """Serves the KV that this worker's prefill-only requests left pinned."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def Fetch(self, request: pb.KvFetchRequest, context: grpc.aio.ServicerContext):
        rid = request.transfer_id
        core = self.engine.engine
        # Claimed here, not through the engine's thread: a prefill worker's steps can be long, and the pinned
        # blocks are not written while pinned, so they are read beside the steps (on a thread of their own: see
        # engine.torch_threads).
        pin = core.pins.claim(TRANSFER, rid)
        try:
            if pin is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"no KV waits under transfer {rid!r} (fetched already, or expired)"
                )
            held = pin.tokens
            if request.start > held:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"transfer {rid!r} holds {held} tokens; asked from {request.start}"
                )
            step = request.chunk_tokens or max(1, CHUNK_BYTES // core.runner.kv_bytes_per_token)
            start, first = request.start, True
            while start < held or first:
                end = min(held, start + step)
                part = await run_on_own_thread(
                    functools.partial(core.runner.kv_transfer, pin.token_ids, pin.block_table, start, end)
                )
                chunk = pb.KvChunk(start=start, num_tokens=end - start, data=part.data, crc32=zlib.crc32(part.data))
                if first:
                    chunk.header.CopyFrom(
                        pb.KvHeader(
                            token_ids=pin.token_ids,
                            end=held,
                            num_layers=part.num_layers,
                            num_kv_heads=part.num_kv_heads,
                            head_dim=part.head_dim,
                            dtype=part.dtype,
                        )
                    )
                    first = False
                yield chunk
                start = end
        finally:  # used once, whatever the outcome (not awaited: a cancelled call's task may not await any more)
            if pin is not None:
                self.engine.submit(lambda: core.pins.release(TRANSFER, rid))


@dataclass
class Fetched:
    """A fetch's outcome: the KV (None when it failed) and what it cost."""

    transfer: KVTransfer | None
    bytes: int
    seconds: float
    error: str = ""


class KvFetcher:
    """The decode side: fetches KV from prefill workers over one channel per address."""

    def __init__(self, credentials: FleetCredentials, deadline_s: float = DEADLINE_S):
        self.credentials = credentials
        self.deadline_s = deadline_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.KvTransferStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.credentials.channel(address, options=CHANNEL_OPTIONS)
        return pb_grpc.KvTransferStub(channel)

    async def fetch(self, source: pb.KvSource, start: int, deadline_s: float | None = None) -> Fetched:
        """Tokens [start, source.num_tokens) of the KV ``source`` names, checked; never raises for a failed
        transfer (``Fetched.error`` says why)."""
        began = time.perf_counter()
        received = 0
        timeout = deadline_s or source.deadline_s or self.deadline_s
        try:
            call = self._stub(source.address).Fetch(
                pb.KvFetchRequest(transfer_id=source.transfer_id, start=start), timeout=timeout
            )
            assembler: _Assembler | None = None
            async for chunk in call:
                received += len(chunk.data)
                if assembler is None:
                    if not chunk.HasField("header"):
                        raise InvalidRequestError("the first chunk has no header", "kv")
                    assembler = _Assembler(chunk.header, start, source.num_tokens)
                assembler.add(chunk)
            if assembler is None:
                raise InvalidRequestError("the transfer sent nothing", "kv")
            transfer = assembler.result()
        except grpc.aio.AioRpcError as exc:
            return Fetched(None, received, time.perf_counter() - began, f"{exc.code().name}: {exc.details()}")
        except (InvalidRequestError, asyncio.TimeoutError) as exc:
            return Fetched(None, received, time.perf_counter() - began, str(exc) or type(exc).__name__)
        return Fetched(transfer, received, time.perf_counter() - began)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class _Assembler:
    """Checks chunks as they come and joins them in token order."""

    def __init__(self, header: pb.KvHeader, start: int, expected_end: int):
        itemsize = DTYPE_BYTES.get(header.dtype)
        if itemsize is None:
            raise InvalidRequestError(f"unknown KV dtype {header.dtype!r}", "kv")
        if header.end != expected_end or len(header.token_ids) < header.end:
            raise InvalidRequestError(
                f"the transfer holds {header.end} tokens of KV; {expected_end} were expected", "kv"
            )
        self.header = header
        self.start = start
        self.next = start
        self.row = 2 * header.num_kv_heads * header.head_dim * itemsize  # one token in one layer
        self.parts: list[bytes] = []

    def add(self, chunk: pb.KvChunk) -> None:
        if chunk.start != self.next or chunk.num_tokens < 1 and self.header.end > self.next:
            raise InvalidRequestError(f"chunk at token {chunk.start}, expected {self.next}", "kv")
        if len(chunk.data) != self.header.num_layers * chunk.num_tokens * self.row:
            raise InvalidRequestError(f"chunk at token {chunk.start} has the wrong size", "kv")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise InvalidRequestError(f"chunk at token {chunk.start} fails its checksum", "kv")
        self.parts.append(chunk.data)
        self.next += chunk.num_tokens

    def result(self) -> KVTransfer:
        h = self.header
        if self.next != h.end:
            raise InvalidRequestError(f"the transfer stopped at token {self.next} of {h.end}", "kv")
        layers = h.num_layers
        # Each chunk is [layers, its tokens, row]: interleave them per layer into [layers, all tokens, row].
        joined = bytearray()
        for layer in range(layers):
            for part in self.parts:
                size = len(part) // layers
                joined += part[layer * size : (layer + 1) * size]
        return KVTransfer(
            token_ids=list(h.token_ids[: h.end]),
            num_tokens=h.end - self.start,
            num_layers=layers,
            num_kv_heads=h.num_kv_heads,
            head_dim=h.head_dim,
            dtype=h.dtype,
            data=bytes(joined),
            start=self.start,
        )
