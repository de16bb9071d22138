"""Kernels of ours for layers kept as integer codes (``quantized_kernels.cpp``), built by ``cpp_kernel``.

**Wide int4 steps** (``int4_dequant_mm``): PyTorch's CPU int4 kernel reads a quarter of bfloat16's bytes, which is
what a decode step of a few rows is bound by, but its time grows with the rows: on a 2-core AVX-512 EPYC a
30-layer step's linears took 24 ms at 16 rows and 682 ms at 512, where bfloat16 GEMMs over the same shapes took
26 and 290 ms. De-quantizing a layer costs about 0.7 ms (a pass that writes its bfloat16 weight once), so from a
few dozen rows on a step is faster de-quantized, and it needs no second copy of the weights in memory. Used only
where the CPU has bfloat16 units (without them a bfloat16 GEMM is slower than float32); where it pays is
measured at start-up (``weight_format``). The weight is the int4 kernel's own arithmetic, (code - 8) * scale +
zero in float32, rounded once to bfloat16, into a buffer the calling thread keeps, so a step does not fault in a
layer's worth of fresh pages.

**int4 layers on int8 dot products** (``int4_vnni_mm``, AVX-512 VNNI and VBMI): each row's activations are
quantized to int8 per group of 32, so a group's dot product with the unsigned 4-bit codes is exact in int32
(``vpdpbusd``) and one multiply by both scales makes it float. Its time grows far more slowly with the rows than
the int4 kernel's (30 layers' linears: 8.2 against 14.8 ms at 16 rows, 110 against 217 ms at 256) and it
reads the int4 kernel's packing, so no second copy. Perplexity 1.0010 x float32's on the held-out text.

**An int8 LM head on int8 dot products** (``int8_vnni_mm``, the same CPUs): its codes, offset to unsigned and
four columns by 16 outputs to a register, against the activations quantized as above. On a 2-core AVX-512 EPYC,
one 49,152 x 576 head: 0.60 ms at 1 row (our GEMV below: 0.70), 1.99 at 16 (a bfloat16 copy: 6.92), 6.44 at
64 (14.36). Where it runs, the head needs neither the GEMV's layout nor a bfloat16 copy.

**The int8 LM head's narrow steps** (``int8_gemv``): PyTorch's int8 kernel took 1.5-1.8 ms for one row of a
49,152 x 576 head, ours 0.5 ms alone and 0.8-1.0 ms less per one-sequence step in place. It reads the codes
interleaved by 16 output rows, so sixteen outputs accumulate in one AVX-512 register; activations stay float32
(PyTorch's kernel rounds them to bfloat16). AVX-512 only.

``FLEETSERVE_INT4_DEQUANT=off``, ``FLEETSERVE_INT4_VNNI=off`` and ``FLEETSERVE_INT8_GEMV=off`` turn each path
off (for comparisons).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fleetserve.engine.cpp_kernel import CppKernel, cpu_flags


def _rows_by(n_out, dtype):
    """The shape function of an op whose output is [x's rows, n_out(args)] in ``dtype``."""
    return lambda x, *rest: x.new_empty((x.shape[0], n_out(*rest)), dtype=dtype)


KERNEL = CppKernel(
    "quantized",
    Path(__file__).with_name("quantized_kernels.cpp"),
    {
        "int4_dequant_mm": _rows_by(lambda packed, scales_and_zeros, n_out: n_out, torch.bfloat16),
        "int4_vnni_mm": _rows_by(lambda packed, scales_and_zeros, n_out: n_out, torch.float32),
        "int8_gemv": _rows_by(lambda codes16, scales: codes16.shape[0] * 16, torch.float32),
        "int8_vnni_mm": _rows_by(lambda codes4, scales: codes4.shape[0] * 16, torch.float32),
    },
    "int4 and int8 layers run PyTorch's kernels at every width",
)


def _on(name: str) -> bool:
    return os.environ.get(name, "").lower() not in ("off", "0", "false")


def wide_steps_available(cache_dir: Path) -> bool:
    """Whether wide int4 steps can de-quantize here: not turned off, and the kernels built (or found built)."""
    return _on("FLEETSERVE_INT4_DEQUANT") and KERNEL.ensure_loaded(cache_dir)


def int8_gemv_available(cache_dir: Path) -> bool:
    """Whether an int8 LM head can run its narrow steps on ``int8_gemv``: an AVX-512 CPU, not turned off, built."""
    return " avx512f" in cpu_flags() and _on("FLEETSERVE_INT8_GEMV") and KERNEL.ensure_loaded(cache_dir)


def int4_vnni_available(cache_dir: Path) -> bool:
    """Whether int4 layers can run on ``int4_vnni_mm``: a CPU with AVX-512 VNNI and VBMI, not turned off, built."""
    flags = cpu_flags()
    wanted = " avx512_vnni" in flags and " avx512vbmi" in flags and _on("FLEETSERVE_INT4_VNNI")
    return wanted and KERNEL.ensure_loaded(cache_dir)


def int4_vnni_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n_out: int) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) times an int4 layer in the int4 kernel's packing, on integer dot products
    (float32 result)."""
    return torch.ops.fleetserve.int4_vnni_mm(x, packed, scales_and_zeros, n_out)


def vnni_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] (N a multiple of 16, K of 32) as ``int8_vnni_mm`` reads them: offset to unsigned
    (code + 128), [N / 16, K / 4, 16, 4]."""
    n, k = codes.shape
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
    return unsigned.view(n // 16, 16, k // 4, 4).transpose(1, 2).contiguous()


def int8_vnni_mm(x: torch.Tensor, codes4: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times the int8 weight that ``codes4`` (``vnni_codes``) and per-row float32 ``scales`` stand for,
    on integer dot products (float32 result)."""
    return torch.ops.fleetserve.int8_vnni_mm(x, codes4, scales)


def int4_dequant_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, n_out: int) -> torch.Tensor:
    """x [M, K] times an int4 layer de-quantized to bfloat16 (into a buffer the thread keeps), bfloat16 result."""
    return torch.ops.fleetserve.int4_dequant_mm(x, packed, scales_and_zeros, n_out)


def interleave16(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] (N a multiple of 16) as ``int8_gemv`` reads them: [N / 16, K, 16]."""
    n, k = codes.shape
    return codes.view(n // 16, 16, k).transpose(1, 2).contiguous()


def int8_gemv(x: torch.Tensor, codes16: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times the int8 weight that ``codes16`` (``interleave16``) and per-row ``scales`` stand for."""
    return torch.ops.fleetserve.int8_gemv(x, codes16, scales)
