"""Linear layers that use oneDNN's kernel on CPU, where it streams weights about twice as fast as the default.

At this engine's batch sizes a linear layer is bound by reading its weight from memory. On CPU float32 the
default kernel reaches about half the machine's read bandwidth for one to sixteen rows; oneDNN's linear reaches
most of it, on the same weight tensor (no copy). The op is private to PyTorch, so it is checked against
F.linear once and skipped when absent or different (FLEETSERVE_LINEAR=torch forces the default kernel).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on an unpacked weight. Inside a compiled graph it is called through an op of our own (the
    compiler's lowering of the oneDNN op expects a pre-packed weight); eagerly, straight (that op's Python
    dispatch to a Python function would cost more than a small linear does)."""
    if torch.compiler.is_compiling():
        return torch.ops.fleetserve.onednn_linear(x, weight, bias)
    return _onednn_linear(x, weight, bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Defined with the plain library API: torch.library.custom_op's Python layers would add tens of microseconds to
# each of a step's hundred-odd linears.
_ops = torch.library.Library("fleetserve", "FRAGMENT")
_ops.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_ops.impl("onednn_linear", _onednn_linear, "CPU")
_ops.impl("onednn_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]), "Meta")


@functools.cache
def onednn_linear_works() -> bool:
    """True when the oneDNN linear exists here and agrees with F.linear on a small problem."""
    if os.environ.get("FLEETSERVE_LINEAR", "auto") == "torch":
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    try:
        return torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    except RuntimeError:
        return False


class Linear(nn.Linear):
    """nn.Linear whose CPU float32 forward goes through oneDNN when ``use_onednn`` is set."""

    use_onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_onednn:
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def choose_kernels(model: nn.Module) -> str:
    """Point every Linear of ``model`` at the fastest kernel for its device and dtype; return its name."""
    params = next(model.parameters())
    onednn = params.device.type == "cpu" and params.dtype == torch.float32 and onednn_linear_works()
    for m in model.modules():
        if isinstance(m, Linear):
            m.use_onednn = onednn
    return "onednn" if onednn else "torch"
