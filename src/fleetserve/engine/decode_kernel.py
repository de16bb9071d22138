"""Our decode-attention kernel (``decode_attention.cpp``): reads keys and values straight from the paged cache in
compiled decode steps, where the general path first gathers each sequence's context into a contiguous copy and
then calls ``scaled_dot_product_attention``. On by default; ``FLEETSERVE_DECODE_KERNEL=off`` turns it off.

Work is split by sequence and 64-token piece of context; on AVX-512 the dot products and the softmax's exp are
vectorized (exp as 2^n times a polynomial), and for head sizes of 64 and 128 each token's key and value are read
into registers once for all the query rows of their head, with the values' weighted sums kept in registers (the
same arithmetic in the same order). On a 2-core AVX-512 EPYC, a 16-sequence compiled step's attention took 173
against 489 µs a layer in a profile that way, and alone 70 against 177 µs at 16 sequences of 200 tokens
(bfloat16 cache). Against the general path, alone (float32 cache, 9 query heads over 3 KV heads of 64): 18
against 91 µs at 1 sequence of 256 tokens, 64 against 150 at 4, 273 against 537 at 16 (``benchmarks/
decode_attention.py --part alone``, before the registers). In compiled steps it made no difference in one
benchmark (16 sequences: 30.6 and 28.2 ms against 29.9 and 28.5) and shortened a profiled 16-sequence engine
step in another (29.2 and 31.3 ms against 39.9 and 39.3); no run was slower with it (docs/benchmarks.md).

The kernel is C++, built by ``cpp_kernel``. It is built on the compile warm-up thread before any graph is
traced, so a graph either always or never uses it. Where it cannot be built, the general path serves. The eager
steps of a runner that compiles (mixed steps: decodes beside a prompt) use it too once it is built: a mixed step
of 15 decodes and a 38-token prompt took 42.6-43.8 against 45.6-48.8 ms. A runner that does not compile
(``--no-compile``) never uses it: float32 parity with transformers rests on the general path's rounding.

The same source writes a step's keys and values into their cache slots (``write_slots``) for the steps that
attend with it: one C++ call a layer where the general path stacks keys and values and calls ``index_copy_``
through an op defined in Python.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fleetserve.engine.cpp_kernel import CppKernel

ENV = "FLEETSERVE_DECODE_KERNEL"


def _shape_only(q, kv_cache, slots, mask, scale):
    return torch.empty_like(q)


KERNEL = CppKernel(
    "decode-attention",
    Path(__file__).with_name("decode_attention.cpp"),
    {"decode_attention": _shape_only, "write_slots": lambda kv_cache, slots, k, v: None},
    "compiled steps use the general attention kernel",
)


def wanted() -> bool:
    """Whether this process may use the kernel: unless ``FLEETSERVE_DECODE_KERNEL=off``."""
    return os.environ.get(ENV, "").lower() not in ("off", "0", "false")


def ready() -> bool:
    """Whether ``torch.ops.fleetserve.decode_attention`` is there to call."""
    return KERNEL.ready()


def ensure_loaded(cache_dir: Path) -> bool:
    """Build (or find built) and register the kernel, once per process; whether it is ready."""
    return KERNEL.ensure_loaded(cache_dir)
