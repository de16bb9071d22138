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
    dense_above: int | None = None
    """int4 only: steps of more rows than this run its layers on float32 copies (None: never)."""


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
        return _int4_or_float32(measured_linears_ms(arch))
    if _checkpoint_dtype(model_dir) in ("bfloat16", "float16") and cpu_has_bf16():
        return WeightFormat("bfloat16", torch.bfloat16, "auto: a 16-bit checkpoint on a CPU with bfloat16 units")
    return WeightFormat("float32", torch.float32, "auto on CPU")


def _int4_or_float32(measured: dict[int, tuple[float, float]]) -> WeightFormat:
    """auto's pick from the measurement: int4 where it wins at every measured row count; int4 with float32 copies
    for steps of more rows than it wins at when it wins only at few; float32 when it loses even at one row."""
    figures = ", ".join(f"{rows} rows {i4:.1f}/{f32:.1f} ms" for rows, (i4, f32) in measured.items())
    figures = f"int4/float32 linears per step: {figures}"
    wins = 0
    for rows, (int4_ms, float_ms) in measured.items():
        if int4_ms >= float_ms:
            break
        wins = rows
    if wins == 0:
        return WeightFormat("float32", torch.float32, f"auto: float32 beats the 4-bit codes here; {figures}")
    if wins == max(measured):
        return WeightFormat("int4", torch.float32, f"auto: the checkpoint's 4-bit codes; {figures}")
    reason = f"auto: the checkpoint's 4-bit codes up to {wins} rows a step, float32 copies above; {figures}"
    return WeightFormat("int4", torch.float32, reason, dense_above=wins)


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


MEASURED_ROWS = (1, 4, 16, 64)
"""Rows of the measured steps: decodes of one to a batch of sequences, and a slice of a prompt."""


def measured_linears_ms(arch: ModelArch) -> dict[int, tuple[float, float]]:
    """Per row count of MEASURED_ROWS, (int4, float32) milliseconds of a step's linears over weights of the
    model's layer shapes; measured once per machine, torch version and thread count."""
    shapes = [
        (arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim, arch.hidden_size),
        (arch.hidden_size, arch.num_heads * arch.head_dim),
        (2 * arch.intermediate_size, arch.hidden_size),
        (arch.hidden_size, arch.intermediate_size),
    ]
    key = "|".join(
        [platform.processor() or platform.machine(), _cpu_name(), torch.__version__, str(torch.get_num_threads())]
        + [f"{n}x{k}" for n, k in shapes]
        + [f"rows {','.join(map(str, MEASURED_ROWS))}"]
    )
    path = cache_root() / "weight-format-measurements.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return {int(rows): tuple(ms) for rows, ms in known[key].items()}
    result = _measure(shapes)
    known[key] = {str(rows): ms for rows, ms in result.items()}
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
def _measure(shapes: list[tuple[int, int]]) -> dict[int, tuple[float, float]]:
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

    def best_ms(step, rows: int) -> float:
        inputs = {k: torch.randn(rows, k, generator=g) for _, k in shapes}
        order = [(inputs[k], i) for i, (_, k) in enumerate(shapes * layers)]
        best = math.inf
        for attempt in range(3):  # the first pass warms up
            started = time.perf_counter()
            for x, i in order:
                step(x, i)
            if attempt:
                best = min(best, time.perf_counter() - started)
        return best * 1e3

    return {rows: (best_ms(int4_step, rows), best_ms(float_step, rows)) for rows in MEASURED_ROWS}
