"""Decode-only steps through a compiled graph: one per padded batch size, compiled in the background.

A decode step of a small model on a CPU spends much of its time outside the big matrix products: in Python, in
the dispatch of a few hundred small ops, in elementwise kernels that each read and write their tensor once.
torch.compile (inductor) turns the whole step - embedding, rotary tables, every layer - into one graph with
fused kernels, called with a single Python call.

- A graph exists per batch bucket (1, 2, 4, ... up to max_num_seqs): a step of n sequences runs the smallest
  bucket that holds n, its spare rows padding. Padding rows are one-token sequences at position 0 whose KV goes
  to a spare block that the block pool never hands out, so they touch nothing real.
- The context width (KV length, padded to whole blocks) is a dynamic dimension: a graph is compiled once per
  bucket and never again as sequences grow. ``compiles`` counts them, so tests can hold it to that.
- Compiling takes seconds to a minute per bucket; it runs in a background thread, smallest bucket first, while
  the eager path serves. A bucket serves once its graph is built. Inductor's cache lives under the model cache
  ($FLEETSERVE_CACHE/inductor), so a later start takes a few seconds per bucket.
- The graphs carry no guards on the model's modules (weights, layer attributes), which never change once loaded:
  checking them cost 0.7 ms of a 10 ms one-sequence step. Nor on the KV tensors (a runner that replaces them
  builds a new CompiledDecode) or on module globals (functions, the decode kernel's readiness, fixed before the
  first graph is traced): another 0.1 ms. The step's own inputs and the global state (grad mode, threads) keep
  theirs. Nor does the generated code assert each kernel's output sizes and strides (another 0.35 ms).
- Serving never compiles. A graph is valid for the torch thread count it was built under (part of what
  torch.compile checks before each call), so each bucket is built under the count its steps run with
  (``threads_for``; the count is per thread under OpenMP, so the warm-up thread sets its own). Should a
  check still fail at serving time, the compile it would start is refused, the bucket goes back to eager
  steps, and a warning says so.
- Steps attend with our decode-attention kernel (``decode_kernel``; ``FLEETSERVE_DECODE_KERNEL=off`` turns it
  off), built on the warm-up thread before the first graph is traced.
- Mixed steps, prefills, draft verification and layer ranges that take hidden states from another stage run
  eagerly. The compiled graph rounds like the eager step only to within float noise (fusion reorders
  arithmetic), so the paths whose promise is bit-exactness (float32 parity with transformers) run eagerly:
  ``--no-compile``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from collections.abc import Callable

import torch

from fleetserve.engine.attention import AttentionBatch, build_attention_batch

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes that get a graph: powers of two below ``max_num_seqs``, then ``max_num_seqs``."""
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


def use_inductor_cache(directory: str) -> None:
    """Keep inductor's compiled kernels and graphs in ``directory`` (unless TORCHINDUCTOR_CACHE_DIR says where)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", directory)


def _decode_step(model, ids, positions, kv_caches, slot_mapping, decode_rows, decode_slots, decode_mask):
    batch = AttentionBatch(slot_mapping, decode_rows, True, decode_slots, decode_mask, [])
    return model(ids, positions, kv_caches, batch)


def _guards_kept(entries: list) -> list[bool]:
    """Which of a graph's guards it keeps: none on the model's modules, the KV tensors or module globals (see the
    module's doc); the step's own inputs and the global state keep theirs."""
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [
        keep and not entry.is_global and "kv_caches" not in entry.name
        for keep, entry in zip(modules, entries, strict=True)
    ]


class CompiledDecode:
    """Compiled decode steps for one model; ``run`` returns None where no graph is ready (the caller goes eager)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: Callable[[], list[torch.Tensor]],
        spare_block: Callable[[], int],
        max_num_seqs: int,
        block_size: int,
        device: torch.device,
        threads_for: Callable[[int], int] = lambda rows: torch.get_num_threads(),
        prepare: Callable[[], object] | None = None,
    ):
        self.model = model
        self._prepare = prepare
        """Run on the warm-up thread before the first graph is traced (builds the decode-attention kernel if asked)."""
        self._threads_for = threads_for
        self._kv_caches = kv_caches
        self._spare_block = spare_block
        self.block_size = block_size
        self.device = device
        self.buckets = batch_buckets(max_num_seqs)
        self.ready: dict[int, Callable] = {}
        """Bucket -> its compiled step, once built."""
        self.compiles = 0
        """Graphs compiled so far (every bucket once; more would be recompiles)."""
        self.warm_up_seconds: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warming = threading.local()
        self._steps = {b: self._compile(b) for b in self.buckets}

    def _compile(self, bucket: int) -> Callable:
        # A code object of its own per bucket: each bucket keeps its own graph cache (no limit on recompiles
        # shared between buckets), and one bucket is compiled while another one serves.
        code = _decode_step.__code__.replace(co_name=f"decode_step_{bucket}")
        fn = types.FunctionType(code, _decode_step.__globals__, code.co_name)
        # No guards on the model's modules (see the module's doc): a runner whose layers or KV change builds a
        # new CompiledDecode, so they never change under a graph.
        options = {"guard_filter_fn": _guards_kept}
        return torch.compile(fn, backend=self._backend, dynamic=False, options=options)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        if not getattr(self._warming, "on", False):
            raise RuntimeError("a serving step would compile its graph again")
        self.compiles += 1
        from torch._inductor import config

        # Without the generated code's size and stride asserts (see the module's doc): they check the graph's own
        # shape arithmetic, which the compiled-against-eager tests hold.
        with config.patch(size_asserts=False, alignment_asserts=False, scalar_asserts=False):
            return compile_fx(gm, example_inputs)

    @property
    def pending(self) -> int:
        """Buckets still to compile (0 once the warm-up has finished, stopped or given up)."""
        if self._thread is not None and not self._thread.is_alive():
            return 0
        return len(self.buckets) - len(self.ready)

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(self, ids: list[int], starts: list[int], block_tables: list[list[int]]) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode-only step (sequence i: token ids[i] at position starts[i]);
        None when its bucket has no graph yet."""
        bucket = self.bucket(len(ids))
        step = self.ready.get(bucket) if bucket is not None else None
        if step is None:
            return None
        try:
            return self._call(step, bucket, ids, starts, block_tables)[: len(ids)]
        except Exception as exc:  # the step reruns eagerly, which writes the same KV
            self.ready.pop(bucket, None)
            log.warning("compiled decode step for batch %d failed; its steps run eagerly from now on: %s", bucket, exc)
            return None

    def _call(
        self,
        step: Callable,
        bucket: int,
        ids: list[int],
        starts: list[int],
        tables: list[list[int]],
        pad_start: int = 0,
    ) -> torch.Tensor:
        """Run ``step`` on the sequences given plus padding rows up to ``bucket``: one-token sequences at
        ``pad_start`` whose every block is the spare one."""
        pad = bucket - len(ids)
        spare = [self._spare_block()] * (pad_start // self.block_size + 1)
        starts = starts + [pad_start] * pad
        batch = build_attention_batch(
            starts, [1] * bucket, tables + [spare] * pad, self.block_size, self.device, whole_blocks=True
        )
        torch._dynamo.mark_dynamic(batch.decode_slots, 1)
        torch._dynamo.mark_dynamic(batch.decode_mask, 3)
        return step(
            self.model,
            torch.tensor(ids + [0] * pad, dtype=torch.long, device=self.device),
            torch.tensor(starts, dtype=torch.long, device=self.device),
            self._kv_caches(),
            batch.slot_mapping,
            batch.decode_rows,
            batch.decode_slots,
            batch.decode_mask,
        )

    # -- warm-up ---------------------------------------------------------------------------------------

    def warm_up(self, background: bool = True) -> None:
        """Compile every bucket, smallest first (in a daemon thread unless ``background`` is False)."""
        if not background:
            self._warm_all()
            return
        self._thread = threading.Thread(target=self._warm_all, name="compile-decode", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background warm-up; True when it has finished."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        """Compile no further bucket (the one being compiled finishes)."""
        self._stop.set()

    def _warm_all(self) -> None:
        if self._prepare is not None:
            self._prepare()
        for bucket in self.buckets:
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                self._warm(bucket)
            except Exception as exc:  # an unusable compiler leaves the eager path serving, which is always right
                log.warning("compiling the decode step failed (batch %d); decode steps stay eager: %s", bucket, exc)
                return
            self.warm_up_seconds[bucket] = time.monotonic() - started
            log.info("compiled decode step ready: batch %d in %.1fs", bucket, self.warm_up_seconds[bucket])

    @torch.inference_mode()
    def _warm(self, bucket: int) -> None:
        step = self._steps[bucket]
        threads = torch.get_num_threads()
        torch.set_num_threads(self._threads_for(bucket))
        self._warming.on = True
        try:
            # Padding rows only: the step reads and writes the spare block and nothing else. A second, wider
            # context checks that the width is dynamic (it would count a recompile otherwise).
            for pad_start in (0, self.block_size):
                self._call(step, bucket, [], [], [], pad_start)
        finally:
            self._warming.on = False
            torch.set_num_threads(threads)
        self.ready[bucket] = step
