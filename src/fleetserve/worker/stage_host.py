"""A stage node (`fleetserve worker --role stage`): the model's files, a memory cap, and the range it is assigned.

It starts with no layers loaded: it measures how fast it runs one layer, tells the gateway what it offers (a
``StageProfile``), and waits for ``Assign``. A later stage holds a StageExecutor; the head (layers from 0) holds a
whole LLMEngine with the embeddings, the LM head and the scheduler, whose steps go down a GrpcStageLink. Every
assignment checks the model's fingerprint and layer count, and keeps weights plus KV within the cap.

One thread does a stage's torch work (calibrating, loading its layers, its steps): ``compute``; a head's engine
has its own, and the stage's thread ends when the node becomes a head (``engine.torch_threads`` says why).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from fleetserve.config import EngineConfig
from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from fleetserve.engine.pipeline import StageExecutor, measure_layer_seconds
from fleetserve.errors import FleetServeError, StageLinkError
from fleetserve.model_files import load_arch, prepare_model_dir
from fleetserve.model_files.arch import ModelArch
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol.security import FleetCredentials
from fleetserve.settings.worker import WorkerSettings
from fleetserve.worker.stage_link import GrpcStageLink

log = logging.getLogger(__name__)
T = TypeVar("T")
MiB = 2**20
OPEN_TIMEOUT_S = 30.0


def weights_fingerprint(model_dir: Path) -> str:
    """The model's identity for stages that must agree: its config and its weight files' names and sizes."""
    digest = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:32]


def stage_profile(arch: ModelArch, element_bytes: int, model_dir: Path) -> pb.StageProfile:
    """The model's sizes in this dtype, as the partitioner counts them (layer_seconds is filled in later)."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    table = arch.vocab_size * h
    return pb.StageProfile(
        layer_bytes=layer * element_bytes,
        embed_bytes=table * element_bytes,
        lm_head_bytes=(h + (0 if arch.tie_word_embeddings else table)) * element_bytes,
        lm_head_read_bytes=table * element_bytes,
        kv_bytes_per_token=2 * kv * element_bytes,
        weights_fingerprint=weights_fingerprint(model_dir),
    )


class AssignmentError(FleetServeError):
    """An assignment this node cannot take; the reason goes back to the gateway."""


class StageHost:
    """One stage node's state: what it offers, and the layers (and, as head, the engine) it holds now."""

    def __init__(self, opts: WorkerSettings, credentials: FleetCredentials, name: str):
        self.opts = opts
        self.credentials = credentials
        self.name = name
        self.model_dir = prepare_model_dir(opts.model, progress=False)
        self.arch = load_arch(self.model_dir)
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        element = torch.empty((), dtype=self.dtype).element_size()
        self.profile = stage_profile(self.arch, element, self.model_dir)
        p = self.profile
        whole = p.layer_bytes * self.arch.num_layers + p.embed_bytes + p.lm_head_bytes
        self.memory_cap = (opts.max_memory_mb or 0) * MiB or whole + opts.kv_cache_mb * MiB
        self.max_model_len = min(
            opts.max_model_len or self.arch.max_position_embeddings, self.arch.max_position_embeddings
        )
        self.assignment: pb.StageAssignment | None = None
        self.executor: StageExecutor | None = None
        self.engine: AsyncEngine | None = None
        """The head's engine, while this node is a pipeline's head."""
        self.on_fault: Callable[[str], None] | None = None
        self.on_head_change: Callable[[AsyncEngine | None], None] | None = None
        self.streams: set[asyncio.Queue] = set()
        """Result queues of the Forward streams passing through this stage (ended when it is reassigned)."""
        self.generation = 0
        """Counts assignments: a stream opened under one never runs a step on the layers of a later one."""
        self._lock = asyncio.Lock()
        self.compute = _compute_thread()
        """The thread of this stage's torch work while it is not a head."""

    async def on_compute(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)

    def calibrate(self) -> None:
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.profile.layer_seconds = measure_layer_seconds(self.arch, self.dtype, self.device)
        log.info("stage node %s: one layer's decode step takes %.2f ms", self.name, self.profile.layer_seconds * 1e3)

    @property
    def range(self) -> tuple[int, int]:
        a = self.assignment
        return (a.layer_start, a.layer_end) if a is not None and not a.release else (0, 0)

    # -- assignment ------------------------------------------------------------------------------------------

    async def assign(self, a: pb.StageAssignment) -> pb.StageStatus:
        async with self._lock:
            try:
                return await self._assign(a)
            except (AssignmentError, StageLinkError) as exc:
                log.warning("stage assignment [%d, %d) refused: %s", a.layer_start, a.layer_end, exc)
                return pb.StageStatus(ok=False, detail=str(exc))

    async def _assign(self, a: pb.StageAssignment) -> pb.StageStatus:
        self._check(a)
        self.generation += 1
        self._end_streams("this stage was reassigned")
        if a.release:
            await self._drop_head()
            self.executor, self.assignment = None, a
            return pb.StageStatus(ok=True, detail="released")
        layers = a.layer_end - a.layer_start
        weights = layers * self.profile.layer_bytes
        if a.layer_start == 0:
            weights += self.profile.embed_bytes + self.profile.lm_head_bytes
        per_block = self.opts.block_size * layers * self.profile.kv_bytes_per_token
        room = (self.memory_cap - weights) // per_block
        blocks = a.kv_blocks or room
        if blocks < 1 or blocks > room:
            raise AssignmentError(
                f"layers [{a.layer_start}, {a.layer_end}) need {weights // MiB} MiB of weights and "
                f"{max(blocks, 1) * per_block // MiB} MiB of KV: more than this node's {self.memory_cap // MiB} MiB"
            )
        config = self._config(a, blocks * per_block)
        if a.layer_start == 0:
            await self._become_head(a, config)
        else:
            await self._drop_head()
            self.executor = await self.on_compute(lambda: self._executor(config))
        self.assignment = a
        log.info("stage %s now runs layers [%d, %d) with %d KV blocks", self.name, a.layer_start, a.layer_end, blocks)
        return pb.StageStatus(
            ok=True,
            kv_blocks=blocks,
            layer_start=a.layer_start,
            layer_end=a.layer_end,
            weight_bytes=weights,
            kv_cache_bytes=blocks * per_block,
            max_model_len=self.max_model_len,
        )

    def _check(self, a: pb.StageAssignment) -> None:
        if a.model and a.model != self.opts.served_name:
            raise AssignmentError(f"this node serves model {self.opts.served_name!r}, not {a.model!r}")
        if a.weights_fingerprint and a.weights_fingerprint != self.profile.weights_fingerprint:
            raise AssignmentError("the model's weights fingerprint differs from this node's files")
        if a.release:
            return
        if a.num_layers and a.num_layers != self.arch.num_layers:
            raise AssignmentError(f"the model has {self.arch.num_layers} layers here, not {a.num_layers}")
        if not 0 <= a.layer_start < a.layer_end <= self.arch.num_layers:
            raise AssignmentError(f"layer range [{a.layer_start}, {a.layer_end}) is not within the model's layers")

    def _config(self, a: pb.StageAssignment, kv_bytes: int) -> EngineConfig:
        base = self.opts.engine_config()
        head = a.layer_start == 0
        model = dataclasses.replace(
            base.model, layer_start=a.layer_start, layer_end=a.layer_end, lm_head=head, max_model_len=self.max_model_len
        )
        return dataclasses.replace(base, model=model, cache=dataclasses.replace(base.cache, kv_cache_bytes=kv_bytes))

    def _executor(self, config: EngineConfig) -> StageExecutor:
        current = self.executor
        mc = config.model
        if current is not None and (current.runner.model.layer_start, current.runner.model.layer_end) == (
            mc.layer_start,
            mc.layer_end,
        ):
            current.runner.resize_kv(config.cache.kv_cache_bytes)
            return current
        self.executor = None  # the old layers go before the new ones load
        return StageExecutor(ModelRunner(config.validate(), self.model_dir, self.arch))

    async def _become_head(self, a: pb.StageAssignment, config: EngineConfig) -> None:
        self.executor = None
        if self.engine is None:
            # The stage's compute thread (and with it its OpenMP team) ends; the engine's thread does the work now.
            self.compute.shutdown(wait=False, cancel_futures=True)
            self.compute = _compute_thread()
            self.engine = await AsyncEngine.create(config.validate(), progress=False, **self.opts.stream_options())
            core = self.engine.engine
            if self.on_head_change is not None:
                self.on_head_change(self.engine)
        else:
            core = self.engine.engine
            await self.engine.call(lambda: core.reconfigure(a.layer_end, config.cache.kv_cache_bytes))
        if not a.downstream:
            if a.layer_end != self.arch.num_layers:
                raise AssignmentError(f"a head without later stages must run every layer, not [0, {a.layer_end})")
            await self.engine.call(core.detach_link)
            return
        opening = pb.StageOpen(
            weights_fingerprint=self.profile.weights_fingerprint,
            num_layers=self.arch.num_layers,
            kv_blocks=core.runner.num_blocks,
            route=list(a.downstream),
        )
        link = GrpcStageLink(asyncio.get_running_loop(), self.credentials, opening, self.arch.hidden_size, self._fault)
        await link.open(OPEN_TIMEOUT_S)
        depth = a.depth or len(a.downstream) + 1
        await self.engine.call(lambda: core.attach_link(link, depth, a.name or self.name))

    def _fault(self, reason: str) -> None:
        if self.on_fault is not None:
            self.on_fault(reason)

    async def _drop_head(self) -> None:
        """Stop being a head: the engine stops, its requests' streams fail (the gateway resumes them elsewhere with
        the tokens they had)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            if self.on_head_change is not None:
                self.on_head_change(None)
            await engine.close()
            head = engine.engine.pipeline
            if head is not None and head.link is not None:  # the engine thread has stopped: safe to touch
                head.link.close()

    def _end_streams(self, reason: str) -> None:
        """End every stream through this stage on purpose (a planned change: not a fault to report)."""
        for results in list(self.streams):
            results.put_nowait(StageLinkError(reason, planned=True))

    # -- checks of an incoming chain -----------------------------------------------------------------------------

    def check_opening(self, opening: pb.StageOpen) -> str | None:
        """Why this stage cannot take part in the chain ``opening`` describes (None: it can)."""
        if not opening.route:
            return "the opening names no stage"
        me = opening.route[0]
        if self.executor is None or self.assignment is None:
            return f"stage {self.name} has no layers assigned"
        if opening.weights_fingerprint != self.profile.weights_fingerprint:
            return f"stage {self.name} holds other weights (fingerprint differs)"
        if opening.num_layers != self.arch.num_layers:
            return f"stage {self.name}'s model has {self.arch.num_layers} layers, the head's {opening.num_layers}"
        if (me.layer_start, me.layer_end) != self.range:
            return f"stage {self.name} runs layers [{self.range[0]}, {self.range[1]}), not [{me.layer_start}, {me.layer_end})"
        if opening.kv_blocks > self.executor.num_blocks:
            return (
                f"stage {self.name} holds {self.executor.num_blocks} KV blocks, the pipeline needs {opening.kv_blocks}"
            )
        return None

    async def close(self) -> None:
        self._end_streams("this stage is stopping")
        await self._drop_head()
        self.compute.shutdown(wait=False, cancel_futures=True)


def _compute_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fleetserve-stage")
