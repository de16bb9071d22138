"""Wide steps on int4 layers: de-quantize the layer's codes to bfloat16 (``int4_dequant.cpp``), then one bfloat16
GEMM.

PyTorch's CPU int4 kernel reads a quarter of bfloat16's bytes, which is what a decode step of a few rows is bound
by, but its time grows with the rows: on a 2-core AVX-512 EPYC a 30-layer step's linears took 24 ms at 16 rows and
682 ms at 512, where bfloat16 GEMMs over the same shapes took 26 and 290 ms. De-quantizing a layer costs about
0.7 ms (a pass that writes its bfloat16 weight once), so from a few dozen rows on a step is faster de-quantized;
and it needs no second copy of the weights in memory. Where it pays is measured at start-up (``weight_format``).

Used only where the CPU has bfloat16 units (without them a bfloat16 GEMM is slower than float32) and the kernel
builds (``cpp_kernel``). The weight is the int4 kernel's own arithmetic, (code - 8) * scale + zero in float32,
rounded once to bfloat16.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fleetserve.engine.cpp_kernel import CppKernel

ENV = "FLEETSERVE_INT4_DEQUANT"
"""``off`` keeps every int4 step on PyTorch's int4 kernel (for comparisons)."""


def _shape_only(packed, scales_and_zeros, n_out, k_in):
    return packed.new_empty((k_in, n_out), dtype=torch.bfloat16)


KERNEL = CppKernel(
    "int4-dequant",
    Path(__file__).with_name("int4_dequant.cpp"),
    {"int4_dequant": _shape_only},
    "steps of every width run PyTorch's int4 kernel",
)


def wanted() -> bool:
    return os.environ.get(ENV, "").lower() not in ("off", "0", "false")


def available(cache_dir: Path) -> bool:
    """Whether wide steps can de-quantize here: not turned off, and the kernel built (or found built)."""
    return wanted() and KERNEL.ensure_loaded(cache_dir)


def dequantized_weight_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, n_out: int, k_in: int) -> torch.Tensor:
    """The layer's weight, transposed ([K, N]) and in bfloat16."""
    return torch.ops.fleetserve.int4_dequant(packed, scales_and_zeros, n_out, k_in)
