"""Linear layers with a faster path for single-token steps on CPU.

With one token a step, a linear layer is a matrix-vector product bound by memory bandwidth, and the default
kernel reads the weight at about half the speed the machine allows. A second copy of the weight in a layout the
kernel streams well (MKL's packed format, or the transpose) nearly doubles single-stream decoding speed, at the
cost of that copy's memory. Batched steps keep the ordinary kernel, which is faster for them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear plus an optional single-row fast path (see ``prepare_single_row``)."""

    _mode: str = "none"

    def prepare_single_row(self, mode: str) -> None:
        """mode: "none", "transpose" (a [in, out] copy) or "mkl" (MKL-packed copy; CPU builds with MKL only)."""
        self._mode = mode
        w = self.weight.detach()
        if mode == "transpose":
            self.register_buffer("_single", w.t().contiguous(), persistent=False)
        elif mode == "mkl":
            self.register_buffer("_single", torch.ops.mkl._mkl_reorder_linear_weight(w, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self._mode != "none":
            if self._mode == "mkl":
                return torch.ops.mkl._mkl_linear(x, self._single, self.weight, self.bias, 1)
            y = x @ self._single
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def single_row_mode(device: torch.device, dtype: torch.dtype) -> str:
    """The fast path to use: FLEETSERVE_SINGLE_ROW_LINEAR overrides; on CPU fp32, MKL's if present."""
    forced = os.environ.get("FLEETSERVE_SINGLE_ROW_LINEAR")
    if forced:
        return forced
    if device.type != "cpu" or dtype != torch.float32:
        return "none"
    return (
        "mkl"
        if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available()
        else "transpose"
    )
