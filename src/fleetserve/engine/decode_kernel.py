"""Our decode-attention kernel (``decode_attention.cpp``): reads keys and values straight from the paged cache for
compiled decode steps of a few sequences. Off unless ``FLEETSERVE_DECODE_KERNEL=on``.

Called alone it is 1.3-3.5x faster than the general path (gather each sequence's context into a contiguous copy,
then ``scaled_dot_product_attention``) at 1-4 sequences; but inside a compiled step, in alternating runs, a
step took as long with it as without (1 sequence at 250-450 tokens of context: 13.8 and 13.1 ms against 12.5
and 13.2; at 700-850: 14.9 and 14.7 against 14.4 and 14.2; ``benchmarks/decode_attention.py``,
docs/benchmarks.md). So it is not on by default: building it costs start-up time and it needs a compiler. It is
the base for a faster one (several keys to a vector's lanes, a vectorized exp).

The kernel is C++, built by ``cpp_kernel``. When asked for, it is built on the compile warm-up thread before any
graph is traced, so a graph either always or never uses it. Where it cannot be built, the general path serves;
the eager path never uses it (float32 parity with transformers rests on that path's rounding).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fleetserve.engine.cpp_kernel import CppKernel

MAX_BATCH = 4
"""Decode batches of at most this many sequences use the kernel (where it measured faster)."""

ENV = "FLEETSERVE_DECODE_KERNEL"


def _shape_only(q, kv_cache, slots, mask, scale):
    return torch.empty_like(q)


KERNEL = CppKernel(
    "decode-attention",
    Path(__file__).with_name("decode_attention.cpp"),
    {"decode_attention": _shape_only},
    "compiled steps use the general attention kernel",
)


def wanted() -> bool:
    """Whether this process is asked to use the kernel (``FLEETSERVE_DECODE_KERNEL=on``)."""
    return os.environ.get(ENV, "").lower() in ("on", "1", "true")


def ready() -> bool:
    """Whether ``torch.ops.fleetserve.decode_attention`` is there to call."""
    return KERNEL.ready()


def ensure_loaded(cache_dir: Path) -> bool:
    """Build (or find built) and register the kernel, once per process; whether it is ready."""
    return KERNEL.ensure_loaded(cache_dir)
