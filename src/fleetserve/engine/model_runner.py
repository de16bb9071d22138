"""Executes a scheduler plan on the device: builds the step's tensors once, runs the model, samples.

Owns everything on the device (weights, the KV cache tensors, the sampler) and never sees the queues.
"""

from __future__ import annotations

import math
import mmap

import torch

from fleetserve.config import EngineConfig
from fleetserve.contract import KVTransfer
from fleetserve.engine import decode_kernel
from fleetserve.engine.attention import build_attention_batch
from fleetserve.engine.compiled_decode import CompiledDecode, use_inductor_cache
from fleetserve.engine.models.linear import choose_kernels
from fleetserve.engine.models.loader import load_model
from fleetserve.engine.sampling import Sampler
from fleetserve.engine.scheduler import SampledToken, SchedulerOutput, StepResult
from fleetserve.engine.weight_format import FLOAT_DTYPES, activation_dtype, choose_weight_format
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files.arch import ModelArch
from fleetserve.model_files.catalog import cache_root

DTYPES = FLOAT_DTYPES
SMALL_STEP_ROWS = 4
"""Steps of at most this many rows run on ModelConfig.small_step_threads."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("device cuda was asked for but torch sees no CUDA device", "device")
    return torch.device(name)


def zeros_on_first_touch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU its memory is an anonymous mapping of its own, whose pages the kernel gives (zeroed)
    when first written, so a KV cache takes resident memory as its blocks come into use, not all at start (as
    llama.cpp's does). One mapping per tensor: tensors of one mapping would alias, which a compiled step that
    writes them would have to copy around."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    size = max(1, numel * torch.empty((), dtype=dtype).element_size())
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The activation and KV dtype that ``--dtype name`` runs with."""
    return activation_dtype(name, device)


class ModelRunner:
    """One model (or layer range) with its paged KV cache."""

    def __init__(self, config: EngineConfig, model_dir, arch: ModelArch):
        mc = config.model
        self.device = resolve_device(mc.device)
        self.weight_format = choose_weight_format(mc.dtype, self.device, model_dir, arch)
        self.dtype = self.weight_format.activations
        """The dtype of activations."""
        self.kv_dtype = self.weight_format.kv_dtype
        """The dtype of the KV cache."""
        self.arch = arch
        self.block_size = config.cache.block_size
        wf = self.weight_format
        self.model = load_model(
            model_dir,
            arch,
            mc.layer_start,
            mc.layer_end,
            self.dtype,
            self.device,
            mc.lm_head,
            weights=wf.name,
            dense_above=wf.dense_above,
            wide_above=wf.wide_above,
            head_dense_above=wf.head_dense_above,
            head_kernel=wf.head_kernel,
            vnni_above=wf.vnni_above,
        )
        self.linear_kernel = choose_kernels(self.model)
        self.threads = torch.get_num_threads()
        self.small_step_threads = mc.small_step_threads or self.threads
        self.compiled: CompiledDecode | None = None
        """Compiled decode-only steps (ModelConfig.compile, on a range that takes token ids)."""
        self._max_num_seqs = config.scheduler.max_num_seqs
        self.resize_kv(config.cache.kv_cache_bytes)
        self.sampler = Sampler(arch.vocab_size, set(arch.eos_token_ids), config.seed)
        if mc.compile and self.model.is_first:
            use_inductor_cache(str(cache_root() / "inductor"))
            self._compile_decode()

    def _compile_decode(self) -> None:
        """Start building the compiled decode steps for the current KV tensors (their shape is part of a graph)."""
        self.compiled = CompiledDecode(
            self.model,
            lambda: self.kv_caches,
            lambda: self.num_blocks,
            self._max_num_seqs,
            self.block_size,
            self.device,
            self.threads_for,
            prepare=lambda: decode_kernel.wanted() and decode_kernel.ensure_loaded(cache_root() / "kernels"),
        )
        self.compiled.warm_up()

    def threads_for(self, rows: int) -> int:
        """torch threads for a step of ``rows`` rows."""
        return self.small_step_threads if rows <= SMALL_STEP_ROWS else self.threads

    @property
    def decode_graphs(self) -> tuple[int, int]:
        """Compiled decode steps (built, still to build); (0, 0) when decode steps run eagerly."""
        if self.compiled is None:
            return 0, 0
        return len(self.compiled.ready), self.compiled.pending

    def close(self) -> None:
        """Stop compiling further decode steps (a runner being replaced)."""
        if self.compiled is not None:
            self.compiled.stop()

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over this runner's layers."""
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return self.model.num_local_layers * 2 * self.arch.num_kv_heads * self.arch.head_dim * elem

    def resize_kv(self, kv_cache_bytes: int) -> None:
        """(Re)allocate the KV cache tensors: as many blocks as ``kv_cache_bytes`` holds, all empty."""
        per_token, arch = self.kv_bytes_per_token, self.arch
        num_blocks = int(kv_cache_bytes // (per_token * self.block_size))
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_bytes {kv_cache_bytes} holds no block: one block needs {per_token * self.block_size} bytes",
                "kv_cache_bytes",
            )
        self.kv_caches = []  # the old tensors go before the new ones are made
        self.num_blocks = num_blocks
        slots = num_blocks * self.block_size
        # One spare block past the pool's: the padding rows of a compiled step write there.
        shape = (slots + self.block_size, 2, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = [
            zeros_on_first_touch(shape, self.kv_dtype, self.device) for _ in range(self.model.num_local_layers)
        ]
        self.kv_cache_bytes = per_token * slots
        if self.compiled is not None:  # graphs built for the old tensors' shape would not serve these
            self.close()
            self._compile_decode()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run one step of the plan; return the sampled token of every sequence that reached its end (the tokens
        it emits, for one that verified a draft)."""
        return self.sample(plan, self.forward(plan))

    @torch.inference_mode()
    def forward(self, plan: SchedulerOutput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run this engine's layers on the plan's tokens: [T, hidden] out.

        The first layer range embeds the plan's token ids; later ranges take ``hidden`` from the range before.
        """
        threads = self.threads_for(sum(seq.num_tokens for seq in plan.seqs))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if self.compiled is not None and all(seq.num_tokens == 1 for seq in plan.seqs):
            ids = [seq.token_ids[0] for seq in plan.seqs]
            hidden = self.compiled.run(ids, [s.start for s in plan.seqs], [s.block_table for s in plan.seqs])
            if hidden is not None:
                return hidden
        positions: list[int] = []
        for seq in plan.seqs:
            positions.extend(range(seq.start, seq.start + seq.num_tokens))
        batch = build_attention_batch(
            [s.start for s in plan.seqs],
            [s.num_tokens for s in plan.seqs],
            [s.block_table for s in plan.seqs],
            self.block_size,
            self.device,
        )
        batch.decode_kernel = self.compiled is not None and self.device.type == "cpu"
        if self.model.is_first:
            ids = [t for seq in plan.seqs for t in seq.token_ids]
            inputs = torch.tensor(ids, dtype=torch.long, device=self.device)
        else:
            if hidden is None or tuple(hidden.shape) != (len(positions), self.arch.hidden_size):
                got = None if hidden is None else tuple(hidden.shape)
                raise InvalidRequestError(
                    f"this layer range needs hidden states of shape ({len(positions)}, {self.arch.hidden_size}), "
                    f"got {got}",
                    "hidden",
                )
            inputs = hidden.to(device=self.device, dtype=self.dtype)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.model(inputs, pos, self.kv_caches, batch)

    @torch.inference_mode()
    def logits(self, plan: SchedulerOutput, hidden: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Logits [N, vocab] of the rows that pick a token this step, and the sampling sequences in order: one
        row each, the last ``len(draft) + 1`` of its chunk for a sequence verifying a draft."""
        rows, sampling = [], []
        offset = 0
        for seq in plan.seqs:
            offset += seq.num_tokens
            if seq.samples:
                rows.extend(range(offset - len(seq.draft) - 1, offset))
                sampling.append(seq)
        if len(rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)]
        # The LM head runs only where a token is sampled.
        return self.model.compute_logits(hidden), sampling

    @torch.inference_mode()
    def sample(self, plan: SchedulerOutput, hidden: torch.Tensor) -> StepResult:
        if not any(seq.samples for seq in plan.seqs):
            return {}
        logits, sampling = self.logits(plan, hidden)
        logits = logits.cpu() if logits.device.type != "cpu" else logits
        plain_rows, plain, verified = [], [], {}
        row = 0
        for seq in sampling:
            if seq.draft:
                rows = logits[row : row + len(seq.draft) + 1]
                result = self.sampler.verify(rows, seq.request, seq.draft)
                tokens = zip(result.token_ids, result.logprobs, strict=True)
                verified[seq.request.request_id] = [SampledToken(t, lp) for t, lp in tokens]
            else:
                plain_rows.append(row)
                plain.append(seq.request)
            row += len(seq.draft) + 1
        if not plain:
            return verified
        if len(plain) < row:
            logits = logits[torch.tensor(plain_rows, dtype=torch.long)]
        result = self.sampler(logits, plain)
        sampled = {r.request_id: SampledToken(t, lp) for r, t, lp in zip(plain, result.token_ids, result.logprobs)}
        return sampled | verified

    # -- KV transfer -------------------------------------------------------------------------------------

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        pos = torch.arange(num_tokens)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    @torch.inference_mode()
    def read_kv(self, block_table: list[int], num_tokens: int, first: int = 0) -> torch.Tensor:
        """KV of a sequence's tokens [first, num_tokens): [layers, tokens, 2, kv_heads, head_dim] on the CPU."""
        slots = self._slots(block_table, num_tokens)[first:]
        return torch.stack([cache[slots] for cache in self.kv_caches]).cpu()

    @torch.inference_mode()
    def write_kv(self, block_table: list[int], data: torch.Tensor, first: int = 0) -> None:
        """Inverse of read_kv: place [layers, tokens, 2, kv_heads, head_dim] into the slots of the sequence's
        tokens from ``first`` on."""
        slots = self._slots(block_table, first + data.shape[1])[first:]
        for layer, cache in enumerate(self.kv_caches):
            cache.index_copy_(0, slots, data[layer].to(device=self.device, dtype=self.kv_dtype))

    def kv_transfer(self, token_ids: list[int], block_table: list[int], start: int, end: int) -> KVTransfer:
        """Tokens [start, end) of a sequence's KV; ``token_ids``: its tokens up to ``end`` at least."""
        data = self.read_kv(block_table, end, start)
        # numpy has no bfloat16: ship its raw 16-bit words
        raw = (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy().tobytes()
        return KVTransfer(
            token_ids=list(token_ids[:end]),
            num_tokens=end - start,
            num_layers=self.model.num_local_layers,
            num_kv_heads=self.arch.num_kv_heads,
            head_dim=self.arch.head_dim,
            dtype=str(data.dtype).removeprefix("torch."),
            data=raw,
            start=start,
        )

    @staticmethod
    def kv_tensor(transfer: KVTransfer) -> torch.Tensor:
        dtype = DTYPES[transfer.dtype]
        shape = (transfer.num_layers, transfer.num_tokens, 2, transfer.num_kv_heads, transfer.head_dim)
        if dtype == torch.bfloat16:
            return torch.frombuffer(bytearray(transfer.data), dtype=torch.int16).view(torch.bfloat16).reshape(shape)
        return torch.frombuffer(bytearray(transfer.data), dtype=dtype).reshape(shape)
