"""Layers that run on a checkpoint's integer codes instead of float copies of them.

A GGUF's 4-bit layer weights (Q4_0, Q4_1: groups of 32 along the input, value = scale * code + min) are repacked
for PyTorch's CPU int4 kernel, which reads about a quarter of float16's bytes per token (an eighth of float32's).
The kernel's arithmetic is (code - 8) * scale + zero with scale and zero in bfloat16, so zero = min + 8 * scale;
the codes are the file's own, only the group's scale and min round to bfloat16. Its activations are bfloat16: the
layer casts its input in and its output back, so the rest of the model keeps its own dtype.

8-bit codes (Q8_0, which GGUF files use for the token table) serve the embedding exactly (a lookup de-quantizes
only the rows it reads) and, re-quantized to one scale per output row, an LM head on the int8 kernel.

These kernels win while a step has few rows (decodes) and lose to a GEMM on many (prefill chunks, large
batches). A layer given a ``dense`` copy of its weight (``keep_dense``: float32 on CPUs without bfloat16 units,
bfloat16 for the LM head on CPUs with them) runs steps of more than ``max_rows`` rows on that copy instead; an
int4 layer with ``wide_rows`` set de-quantizes its codes to bfloat16 for steps of more rows than that
(``quantized_kernels``), which needs no copy, and with ``vnni_rows`` set runs steps of more rows than that
(up to ``wide_rows``) on our int8 dot-product kernel; an int8 LM head switched to ``use_gemv`` runs its other
steps on our AVX-512 kernel, one switched to ``use_vnni`` on our int8 dot-product kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fleetserve.engine.models.linear import onednn_linear, onednn_linear_works
from fleetserve.engine.quantized_kernels import (
    int4_dequant_mm,
    int4_vnni_mm,
    int8_gemv,
    int8_vnni_mm,
    interleave16,
    vnni_codes,
)

GROUP = 32
"""Columns per scale in the GGUF formats kept as codes."""


def int4_weight(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The float32 weight that 4-bit ``codes`` [N, K] with ``scales``/``mins`` [N, K / 32] stand for."""
    n, k = codes.shape
    return (codes.float().view(n, -1, GROUP) * scales.unsqueeze(-1) + mins.unsqueeze(-1)).view(n, k)


def int8_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight that 8-bit ``codes`` [N, K] with ``scales`` [N, K / 32] stand for."""
    n, k = codes.shape
    return (codes.float().view(n, -1, GROUP) * scales.unsqueeze(-1)).view(n, k)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W held as 4-bit codes in groups of 32, on PyTorch's CPU int4 kernel or, for the row
    counts set, on ours (module doc)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        zeros = mins + 8 * scales
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack((scales.t(), zeros.t()), -1).bfloat16().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.dense: torch.Tensor | None = None
        self.dense_onednn = False
        self.max_rows = 0
        self.wide_rows: int | None = None
        """Steps of more rows than this de-quantize the codes to bfloat16 and run one GEMM (None: never)."""
        self.vnni_rows: int | None = None
        """Steps of more rows than this (and no more than ``wide_rows``) run on our int8 dot-product kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.max_rows:
            return dense_linear(x, self.dense, self.bias, self.dense_onednn)
        if self.wide_rows is not None and x.shape[0] > self.wide_rows:
            y = int4_dequant_mm(x, self.packed, self.scales_and_zeros, self.out_features)
        elif self.vnni_rows is not None and x.shape[0] > self.vnni_rows:
            y = int4_vnni_mm(x, self.packed, self.scales_and_zeros, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Linear(nn.Module):
    """y = x W^T with W re-quantized to int8 with one scale per output row, on PyTorch's int8 kernel."""

    SLICE = 4096
    """Rows re-quantized at a time: float temporaries of a whole LM head would be hundreds of MiB."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._requantize(lambda rows: weight[rows].float(), *weight.shape)

    @classmethod
    def from_q8(cls, codes: torch.Tensor, scales: torch.Tensor) -> Int8Linear:
        """From 8-bit ``codes`` [N, K] with ``scales`` [N, K / 32] (Q8_0), never holding the whole float weight."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._requantize(lambda rows: int8_weight(codes[rows], scales[rows]), *codes.shape)
        return layer

    def _requantize(self, rows_of, n: int, k: int) -> None:
        self.out_features, self.in_features = n, k
        codes, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
        for start in range(0, n, self.SLICE):
            rows = slice(start, start + self.SLICE)
            w = rows_of(rows)
            scales[rows] = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            codes[rows] = torch.round(w / scales[rows].unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.bfloat16())
        self.codes16: torch.Tensor | None = None
        """The codes interleaved for ``int8_gemv`` (``use_gemv``), which then replace ``codes``."""
        self.codes4: torch.Tensor | None = None
        """The codes laid out for ``int8_vnni_mm`` (``use_vnni``), which then replace ``codes``."""
        self.dense: torch.Tensor | None = None
        self.dense_onednn = False
        self.max_rows = 0

    def use_kernel(self, name: str) -> None:
        """Run the steps that take no dense copy on ``name``: "int8" (PyTorch's), "gemv" or "vnni" (ours)."""
        if name == "gemv":
            self.use_gemv()
        elif name == "vnni":
            self.use_vnni()
        elif name != "int8":
            raise ValueError(f"no int8 kernel {name!r}")

    def use_gemv(self) -> None:
        """Run the steps that take no dense copy on our int8 kernel (``quantized_kernels.int8_gemv``)."""
        self.codes16 = interleave16(self.codes)
        self.codes = None

    def use_vnni(self) -> None:
        """Run the steps that take no dense copy on our int8 dot-product kernel (``quantized_kernels``)."""
        self.codes4 = vnni_codes(self.codes)
        self.codes = None
        self.scales = self.scales.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.max_rows:
            return dense_linear(x, self.dense, None, self.dense_onednn)
        if self.codes4 is not None:
            return int8_vnni_mm(x, self.codes4, self.scales).to(x.dtype)
        if self.codes16 is not None:
            return int8_gemv(x, self.codes16, self.scales).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.codes, self.scales).to(x.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """x W^T (+ b) in the weight's dtype (x cast to it and the result back), through oneDNN's kernel when
    ``onednn`` (onednn_linear_works(), asked once)."""
    xw = x.to(weight.dtype)
    y = onednn_linear(xw, weight, None) if onednn else torch.nn.functional.linear(xw, weight)
    y = y.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def keep_dense(
    layer: Int4Linear | Int8Linear, weight: torch.Tensor, max_rows: int, dtype: torch.dtype = torch.float32
) -> None:
    """Give ``layer`` a copy of its weight in ``dtype`` for steps of more than ``max_rows`` rows."""
    layer.dense = weight.to(dtype).contiguous()
    layer.dense_onednn = onednn_linear_works()
    layer.max_rows = max_rows


class Int8Embedding(nn.Module):
    """A token table held as 8-bit codes in groups of 32; a lookup de-quantizes the rows it reads (exactly)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.dtype = dtype
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids].float().view(-1, self.embedding_dim // GROUP, GROUP) * self.scales[ids].unsqueeze(-1)
        return rows.view(*ids.shape, self.embedding_dim).to(self.dtype)

    def weight(self) -> torch.Tensor:
        """The whole table in float32 (for a tied LM head)."""
        return int8_weight(self.codes, self.scales)


@functools.cache
def int4_kernels_work() -> bool:
    """True when PyTorch's CPU int4 and int8 kernels exist here and agree with float32 on a small problem."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_weight_int8pack_mm")):
        return False
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    scales, mins = torch.rand(32, 2, generator=g) / 8, -torch.rand(32, 2, generator=g)
    x = torch.randn(3, 64, generator=g)
    try:
        y4 = Int4Linear(codes, scales, mins, None)(x)
        w = int4_weight(codes, scales, mins)
        y8 = Int8Linear(w)(x)
    except (RuntimeError, NotImplementedError):
        return False
    ref = x @ w.t()
    tolerance = 0.05 * ref.abs().max()
    return bool((y4 - ref).abs().max() < tolerance and (y8 - ref).abs().max() < tolerance)
