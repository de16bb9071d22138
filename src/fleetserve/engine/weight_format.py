"""Which form an engine's weights take: float32, bfloat16, float16, or int4 (a 4-bit checkpoint's own codes).

``auto`` picks the fastest form that is no less faithful than the checkpoint on this machine:
- on CUDA, bfloat16;
- on CPU, a checkpoint with 4-bit layer codes (a Q4_0/Q4_1 GGUF) runs ``int4`` when PyTorch's int4 kernel works
  here and a short measurement says it steps faster than float32 (decode steps of one and of eight sequences over
  weights of the model's layer shapes, more of them than a cache holds); the result is kept in the cache folder,
  so later starts skip it;
- a bfloat16 or float16 checkpoint runs bfloat16 where the CPU has bfloat16 units (AVX512-BF16 or AMX);
- float32 elsewhere. float32 is also the form that equals transformers token for token.

Activations and the KV cache are float32 for int4 (the layers cast to bfloat16 inside their kernel only).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fleetserve.engine.models.linear import onednn_linear, onednn_linear_works
from fleetserve.engine.models.loader import has_four_bit_layers
from fleetserve.engine.models.quantized import Int4Linear, int4_kernels_work
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files.arch import ModelArch
from fleetserve.model_files.catalog import cache_root

log = logging.getLogger(__name__)

FORMATS = ("auto", "float32", "bfloat16", "float16", "int4")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEASURE_BYTES = 256 * 2**20
"""float32 weight bytes the measurement streams through: more than a server's last-level cache holds."""


@dataclass(frozen=True)
class WeightFormat:
    """The chosen form: its name, the dtype of activations and KV, and why it was chosen."""

    name: str
    activations: torch.dtype
    reason: str


def choose_weight_format(requested: str, device: torch.device, model_dir: Path, arch: ModelArch) -> WeightFormat:
    if requested in FLOAT_DTYPES:
        return WeightFormat(requested, FLOAT_DTYPES[requested], "asked for")
    if requested == "int4":
        problem = _int4_unavailable(device, model_dir)
        if problem:
            raise InvalidRequestError(f"dtype int4 is not available: {problem}", "dtype")
        return WeightFormat("int4", torch.float32, "asked for")
    if requested != "auto":
        raise InvalidRequestError(f"dtype must be one of {', '.join(FORMATS)}, got {requested!r}", "dtype")
    if device.type == "cuda":
        return WeightFormat("bfloat16", torch.bfloat16, "auto on CUDA")
    if not _int4_unavailable(device, model_dir):
        int4_ms, float_ms = measured_step_ms(arch)
        figures = f"{int4_ms:.1f} ms against {float_ms:.1f} ms for float32 per measured step"
        if int4_ms < float_ms:
            return WeightFormat("int4", torch.float32, f"auto: the checkpoint's 4-bit codes, {figures}")
        return WeightFormat("float32", torch.float32, f"auto: float32 beats the 4-bit codes here, {figures}")
    if _checkpoint_dtype(model_dir) in ("bfloat16", "float16") and cpu_has_bf16():
        return WeightFormat("bfloat16", torch.bfloat16, "auto: a 16-bit checkpoint on a CPU with bfloat16 units")
    return WeightFormat("float32", torch.float32, "auto on CPU")


def activation_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The activation and KV dtype a format runs with, without loading anything (auto's int4 and float32 agree)."""
    if requested in FLOAT_DTYPES:
        return FLOAT_DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _int4_unavailable(device: torch.device, model_dir: Path) -> str | None:
    if device.type != "cpu":
        return "the int4 kernel runs on CPU only"
    if not has_four_bit_layers(model_dir):
        return "the checkpoint has no 4-bit layer codes (int4 runs a Q4_0 or Q4_1 GGUF's own codes)"
    if not int4_kernels_work():
        return "this PyTorch build lacks a working CPU int4 kernel"
    return None


def _checkpoint_dtype(model_dir: Path) -> str | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("torch_dtype") or config.get("dtype")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measured_step_ms(arch: ModelArch) -> tuple[float, float]:
    """(int4, float32) milliseconds of the layers' linears for a decode step of 1 plus one of 8 sequences,
    over weights of the model's layer shapes; measured once per machine, torch version and thread count."""
    shapes = [
        (arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim, arch.hidden_size),
        (arch.hidden_size, arch.num_heads * arch.head_dim),
        (2 * arch.intermediate_size, arch.hidden_size),
        (arch.hidden_size, arch.intermediate_size),
    ]
    key = "|".join(
        [platform.processor() or platform.machine(), _cpu_name(), torch.__version__, str(torch.get_num_threads())]
        + [f"{n}x{k}" for n, k in shapes]
    )
    path = cache_root() / "weight-format-measurements.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return tuple(known[key])
    result = _measure(shapes)
    known[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.monotonic_ns()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot keep the weight-format measurement in %s: %s", path, exc)
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


@torch.inference_mode()
def _measure(shapes: list[tuple[int, int]]) -> tuple[float, float]:
    layer_elems = sum(n * k for n, k in shapes)
    layers = max(2, math.ceil(MEASURE_BYTES / 4 / layer_elems))
    # one allocation for all float weights, so it goes back to the system as a whole when freed
    flat = torch.zeros(layers * layer_elems)
    floats, offset = [], 0
    for _ in range(layers):
        for n, k in shapes:
            floats.append(flat[offset : offset + n * k].view(n, k))
            offset += n * k
    g = torch.Generator().manual_seed(0)
    int4 = []
    for n, k in shapes:  # distinct codes per layer would only cost start-up time: reuse one set, repacked each time
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales, mins = torch.rand(n, k // 32, generator=g) / 64, -torch.rand(n, k // 32, generator=g) / 8
        int4.append((codes, scales, mins))
    int4_layers = [Int4Linear(*w, None) for _ in range(layers) for w in int4]
    float_linear = onednn_linear if onednn_linear_works() else (lambda x, w, b: torch.nn.functional.linear(x, w, b))

    def int4_step(x: torch.Tensor, i: int) -> torch.Tensor:
        return int4_layers[i](x)

    def float_step(x: torch.Tensor, i: int) -> torch.Tensor:
        return float_linear(x, floats[i], None)

    results = []
    for step in (int4_step, float_step):
        total = 0.0
        for rows in (1, 8):
            inputs = {k: torch.randn(rows, k, generator=g) for _, k in shapes}
            order = [(inputs[k], i) for i, (_, k) in enumerate(shapes * layers)]
            best = math.inf
            for attempt in range(4):  # the first pass warms up
                started = time.perf_counter()
                for x, i in order:
                    step(x, i)
                if attempt:
                    best = min(best, time.perf_counter() - started)
            total += best
        results.append(total * 1e3)
    return results[0], results[1]
