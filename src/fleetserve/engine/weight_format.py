"""Which form an engine's weights take: float32, bfloat16, float16, or int4 (a 4-bit checkpoint's own codes).

``auto`` picks the fastest form that is no less faithful than the checkpoint on this machine:
- on CUDA, bfloat16;
- on CPU, a checkpoint with 4-bit layer codes (a Q4_0/Q4_1 GGUF) runs ``int4`` when PyTorch's int4 kernel works
  here and a short measurement says it steps faster than float32 (decode steps of one and of eight sequences over
  weights of the model's layer shapes, more of them than a cache holds); the result is kept in the cache folder,
  so later starts skip it;
- a bfloat16 or float16 checkpoint runs bfloat16 where the CPU has bfloat16 units (AVX512-BF16 or AMX);
- float32 elsewhere. float32 is also the form that equals transformers token for token.

int4 on a CPU with bfloat16 units also measures, once per machine, the row counts from which a step is faster
with its layers de-quantized to bfloat16 (``quantized_kernels``) and with a bfloat16 copy of the LM head than on
the int4 and int8 kernels, and takes those paths above them (``wide_above``, ``head_dense_above``); on AVX-512
the int8 LM head's other steps run on our GEMV (``head_kernel``). Where the CPU has AVX-512 VNNI and VBMI it also
measures from which row count the layers run faster on our int8 dot-product kernel than on the int4 kernel
(``vnni_above``); the wide paths are then measured against that.

Activations are float32 for int4 (the layers cast to bfloat16 or quantize inside their kernels only); the KV
cache is bfloat16 where the CPU has bfloat16 units (``kv_dtype``: a decode step reads all of its context, so half
the bytes is a shorter step and half the memory), float32 elsewhere.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fleetserve.engine import quantized_kernels
from fleetserve.engine.models.linear import onednn_linear, onednn_linear_works
from fleetserve.engine.models.loader import has_four_bit_layers
from fleetserve.engine.models.quantized import Int4Linear, Int8Linear, dense_linear, int4_kernels_work
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files.arch import ModelArch
from fleetserve.model_files.catalog import cache_root

log = logging.getLogger(__name__)

FORMATS = ("auto", "float32", "bfloat16", "float16", "int4")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEASURE_BYTES = 256 * 2**20
"""float32 weight bytes the measurement streams through: more than a server's last-level cache holds."""


HEAD_KERNELS = {
    "int8": "PyTorch's int8 kernel",
    "gemv": "our AVX-512 GEMV (quantized_kernels.int8_gemv)",
    "vnni": "int8 dot products (quantized_kernels.int8_vnni_mm)",
}
"""What an int8 LM head can run on (``Int8Linear.use_kernel``)."""


@dataclass(frozen=True)
class WeightFormat:
    """The chosen form: its name, the dtype of activations and KV, and why it was chosen."""

    name: str
    activations: torch.dtype
    reason: str
    dense_above: int | None = None
    """int4 only: steps of more rows than this run its layers on float32 copies (None: never)."""
    wide_above: int | None = None
    """int4 only: steps of more rows than this de-quantize the layers to bfloat16 (None: never)."""
    head_dense_above: int | None = None
    """int4 only: steps of more rows than this run the LM head on a bfloat16 copy (None: never)."""
    head_kernel: str = "int8"
    """int4 only: what the int8 LM head's steps without a bfloat16 copy run on, a key of HEAD_KERNELS."""
    kv: torch.dtype | None = None
    """The KV cache's dtype where it is not the activations' (``kv_dtype``)."""
    vnni_above: int | None = None
    """int4 only: steps of more rows than this (up to ``wide_above``) run the layers on our integer dot-product
    kernel (``quantized_kernels.int4_vnni_mm``; None: never)."""

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype of the KV cache."""
        return self.kv or self.activations


def choose_weight_format(requested: str, device: torch.device, model_dir: Path, arch: ModelArch) -> WeightFormat:
    if requested in FLOAT_DTYPES:
        return WeightFormat(requested, FLOAT_DTYPES[requested], "asked for")
    if requested == "int4":
        problem = _int4_unavailable(device, model_dir)
        if problem:
            raise InvalidRequestError(f"dtype int4 is not available: {problem}", "dtype")
        return _kernel_paths(WeightFormat("int4", torch.float32, "asked for"), arch)
    if requested != "auto":
        raise InvalidRequestError(f"dtype must be one of {', '.join(FORMATS)}, got {requested!r}", "dtype")
    if device.type == "cuda":
        return WeightFormat("bfloat16", torch.bfloat16, "auto on CUDA")
    if not _int4_unavailable(device, model_dir):
        return _kernel_paths(_int4_or_float32(measured_linears_ms(arch, _vnni_above(arch)[0])), arch)
    if _checkpoint_dtype(model_dir) in ("bfloat16", "float16") and cpu_has_bf16():
        return WeightFormat("bfloat16", torch.bfloat16, "auto: a 16-bit checkpoint on a CPU with bfloat16 units")
    return WeightFormat("float32", torch.float32, "auto on CPU")


def _int4_or_float32(measured: dict[int, tuple[float, float]]) -> WeightFormat:
    """auto's pick from the measurement: int4 where it wins at every measured row count; int4 with float32 copies
    for steps of more rows than it wins at when it wins only at few; float32 when it loses even at one row."""
    figures = f"int4/float32 linears per step: {_figures(measured)}"
    wins = narrow_wins_up_to(measured)
    if wins == 0:
        return WeightFormat("float32", torch.float32, f"auto: float32 beats the 4-bit codes here; {figures}")
    if wins is None:
        return WeightFormat("int4", torch.float32, f"auto: the checkpoint's 4-bit codes; {figures}")
    reason = f"auto: the checkpoint's 4-bit codes up to {wins} rows a step, float32 copies above; {figures}"
    return WeightFormat("int4", torch.float32, reason, dense_above=wins)


def narrow_wins_up_to(measured: dict[int, tuple[float, float]]) -> int | None:
    """From (narrow path, wide path) milliseconds per row count, ascending: the last row count before the narrow
    path first loses (0 when it loses at the first), None when it wins at every one."""
    wins = 0
    for rows, (narrow_ms, wide_ms) in measured.items():
        if narrow_ms >= wide_ms:
            return wins
        wins = rows
    return None


def _above(rows: int | None) -> str:
    return "never" if rows is None else f"above {rows} rows"


def _figures(measured: dict[int, tuple[float, float]]) -> str:
    return ", ".join(f"{rows} rows {a:.1f}/{b:.1f} ms" for rows, (a, b) in measured.items())


def _kernel_paths(wf: WeightFormat, arch: ModelArch) -> WeightFormat:
    """int4 on an AVX-512 CPU: the LM head's narrow steps on our int8 kernel; with VNNI and VBMI, the row count
    above which the layers run on our integer dot-product kernel; with bfloat16 units too, the row counts above
    which the layers de-quantize to bfloat16 and the LM head runs on a bfloat16 copy; each where a measurement
    says it beats the path below it."""
    if wf.name != "int4":
        return wf
    if cpu_has_bf16():  # half the bytes every decode step reads, and half the memory
        wf = dataclasses.replace(wf, reason=f"{wf.reason}; KV cache in bfloat16", kv=torch.bfloat16)
    kernels = cache_root() / "kernels"
    vnni, measured = _vnni_above(arch)
    head = "vnni" if measured else "gemv" if quantized_kernels.int8_gemv_available(kernels) else "int8"
    if head != "int8":
        wf = dataclasses.replace(wf, reason=f"{wf.reason}; the int8 LM head on {HEAD_KERNELS[head]}", head_kernel=head)
    if vnni is not None:
        reason = f"{wf.reason}; layers on int8 dot products above {vnni} rows (int4 kernel/ours: {_figures(measured)})"
        wf = dataclasses.replace(wf, reason=reason, vnni_above=vnni)
    if wf.dense_above is not None or not cpu_has_bf16() or not quantized_kernels.wide_steps_available(kernels):
        return wf
    layers, head = measured_wide_ms(arch, wf.head_kernel, wf.vnni_above)
    wide, head_dense = narrow_wins_up_to(layers), narrow_wins_up_to(head)
    int8 = f"int8 ({wf.head_kernel})"
    reason = (
        f"{wf.reason}; layers de-quantized to bfloat16 {_above(wide)}, LM head in bfloat16 {_above(head_dense)}"
        f" (narrow/de-quantized layers: {_figures(layers)}; {int8}/bfloat16 LM head: {_figures(head)})"
    )
    return dataclasses.replace(wf, reason=reason, wide_above=wide, head_dense_above=head_dense)


def _vnni_above(arch: ModelArch) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """The row count above which int4 layers run on our int8 dot products (None: never, or not on this CPU), and
    the measurement it comes from ({} where the kernel is not available here)."""
    if not quantized_kernels.int4_vnni_available(cache_root() / "kernels"):
        return None, {}
    measured = measured_vnni_ms(arch)
    return narrow_wins_up_to(measured), measured


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


WIDE_ROWS = (4, 16, 64, 256)
"""Rows of the steps measured for the wide paths: a decode batch to a prompt chunk."""

VNNI_ROWS = (1, 2, 4, 8, 16)
"""Rows of the steps measured for the int8 dot-product kernel against the int4 kernel."""


def _layer_shapes(arch: ModelArch) -> list[tuple[int, int]]:
    """(out, in) of a decoder layer's four linears (q/k/v and gate/up fused)."""
    return [
        (arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim, arch.hidden_size),
        (arch.hidden_size, arch.num_heads * arch.head_dim),
        (2 * arch.intermediate_size, arch.hidden_size),
        (arch.hidden_size, arch.intermediate_size),
    ]


def _machine_key(shapes: list[tuple[int, int]], rows: tuple[int, ...]) -> list[str]:
    return (
        [platform.processor() or platform.machine(), _cpu_name(), torch.__version__, str(torch.get_num_threads())]
        + [f"{n}x{k}" for n, k in shapes]
        + [f"rows {','.join(map(str, rows))}"]
    )


def measured_linears_ms(arch: ModelArch, vnni_above: int | None = None) -> dict[int, tuple[float, float]]:
    """Per row count of MEASURED_ROWS, (int4, float32) milliseconds of a step's linears over weights of the
    model's layer shapes, int4 as it will run (above ``vnni_above`` rows on our int8 dot products); measured once
    per machine, torch version and thread count."""
    shapes = _layer_shapes(arch)
    key = _machine_key(shapes, MEASURED_ROWS) + ([] if vnni_above is None else [f"vnni above {vnni_above}"])
    known = _remembered("|".join(key), lambda: _measure(shapes, vnni_above))
    return {int(rows): tuple(ms) for rows, ms in known.items()}


def measured_vnni_ms(arch: ModelArch) -> dict[int, tuple[float, float]]:
    """Per row count of VNNI_ROWS, (int4 kernel, int8 dot products) milliseconds of a step's linears; measured
    once per machine like ``measured_linears_ms``."""
    shapes = _layer_shapes(arch)
    known = _remembered("|".join(["vnni", *_machine_key(shapes, VNNI_ROWS)]), lambda: _measure_vnni(shapes))
    return {int(rows): tuple(ms) for rows, ms in known.items()}


def measured_wide_ms(
    arch: ModelArch, head_kernel: str, vnni_above: int | None = None
) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    """Per row count of WIDE_ROWS, (narrow path, de-quantized to bfloat16) milliseconds of a step's linears, the
    narrow path the int4 kernel or, above ``vnni_above`` rows, our int8 dot products; and (int8, bfloat16 copy)
    milliseconds of its LM head, the int8 one on ``head_kernel`` (a key of HEAD_KERNELS): each side as it will
    run. Measured once per machine like ``measured_linears_ms``."""
    shapes = _layer_shapes(arch)
    head = (arch.vocab_size, arch.hidden_size)
    key = "|".join(
        [
            "wide",
            *_machine_key(shapes, WIDE_ROWS),
            f"head {head[0]}x{head[1]} on {head_kernel}",
            f"vnni above {vnni_above}",
        ]
    )
    known = _remembered(key, lambda: _measure_wide(shapes, head, head_kernel, vnni_above))
    return tuple({int(rows): tuple(ms) for rows, ms in known[part].items()} for part in ("layers", "head"))


def _remembered(key: str, measure: Callable[[], dict]) -> dict:
    """The measurement kept under ``key`` in the cache folder, or ``measure()``'s, kept there for next time. A
    process that finds another measuring waits for its result (a lock file beside the measurements): processes
    started together on one machine must choose alike, and measuring side by side would disturb both."""
    path = cache_root() / "weight-format-measurements.json"
    known = _read_measurements(path)
    if key in known:
        return known[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held until the measurement is kept
    except OSError as exc:
        log.warning("cannot lock the weight-format measurement in %s: %s", path.parent, exc)
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read_measurements(path)
        if key in known:  # another process measured while this one waited
            return known[key]
        known[key] = json.loads(json.dumps(measure()))  # as it reads back: string keys, lists
        try:
            tmp = path.with_suffix(f".{time.monotonic_ns()}")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot keep the weight-format measurement in %s: %s", path, exc)
        return known[key]
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _read_measurements(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def _int4_layers(shapes: list[tuple[int, int]], layers: int, g: torch.Generator) -> list[Int4Linear]:
    """``layers`` sets of int4 linears of ``shapes`` (random codes; one set of codes per shape, repacked for each
    layer: distinct codes would only cost start-up time)."""
    codes = []
    for n, k in shapes:
        scales, mins = torch.rand(n, k // 32, generator=g) / 64, -torch.rand(n, k // 32, generator=g) / 8
        codes.append((torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), scales, mins))
    return [Int4Linear(*c, None) for _ in range(layers) for c in codes]


def _best_ms(steps: list[Callable], calls: list[tuple[torch.Tensor, int]], timed: int = 3) -> list[float]:
    """Per step, the quickest of ``timed`` passes of ``step(x, i)`` over ``calls``, after one that warms up. The
    steps take turns pass by pass, so a burst of another process's work slows both sides of a comparison alike
    (one-sided bursts had flipped a decision that is kept for good)."""
    best = [math.inf] * len(steps)
    for attempt in range(timed + 1):
        for j, step in enumerate(steps):
            started = time.perf_counter()
            for x, i in calls:
                step(x, i)
            if attempt:
                best[j] = min(best[j], time.perf_counter() - started)
    return [b * 1e3 for b in best]


def _layer_calls(shapes: list[tuple[int, int]], layers: int, rows: int, g: torch.Generator) -> list:
    inputs = {k: torch.randn(rows, k, generator=g) for _, k in shapes}
    return [(inputs[k], i) for i, (_, k) in enumerate(shapes * layers)]


def _layer_count(shapes: list[tuple[int, int]]) -> int:
    """Layers whose float32 weights exceed MEASURE_BYTES."""
    return max(2, math.ceil(MEASURE_BYTES / 4 / sum(n * k for n, k in shapes)))


@torch.inference_mode()
def _measure(shapes: list[tuple[int, int]], vnni_above: int | None) -> dict[int, tuple[float, float]]:
    layers = _layer_count(shapes)
    layer_elems = sum(n * k for n, k in shapes)
    # one allocation for all float weights, so it goes back to the system as a whole when freed
    flat = torch.zeros(layers * layer_elems)
    floats, offset = [], 0
    for _ in range(layers):
        for n, k in shapes:
            floats.append(flat[offset : offset + n * k].view(n, k))
            offset += n * k
    g = torch.Generator().manual_seed(0)
    int4_layers = _int4_layers(shapes, layers, g)
    for layer in int4_layers:
        layer.vnni_rows = vnni_above
    float_linear = onednn_linear if onednn_linear_works() else (lambda x, w, b: torch.nn.functional.linear(x, w, b))

    def int4_step(x: torch.Tensor, i: int) -> torch.Tensor:
        return int4_layers[i](x)

    def float_step(x: torch.Tensor, i: int) -> torch.Tensor:
        return float_linear(x, floats[i], None)

    result = {}
    for rows in MEASURED_ROWS:
        calls = _layer_calls(shapes, layers, rows, g)
        result[rows] = tuple(_best_ms([int4_step, float_step], calls))
    return result


@torch.inference_mode()
def _measure_vnni(shapes: list[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    layers = _layer_count(shapes)
    int4_layers = _int4_layers(shapes, layers, g)

    def step(x: torch.Tensor, i: int, vnni: int | None) -> torch.Tensor:
        int4_layers[i].vnni_rows = vnni
        return int4_layers[i](x)

    calls = {rows: _layer_calls(shapes, layers, rows, g) for rows in VNNI_ROWS}
    sides = [lambda x, i: step(x, i, None), lambda x, i: step(x, i, 0)]
    return {rows: tuple(_best_ms(sides, calls[rows])) for rows in VNNI_ROWS}


@torch.inference_mode()
def _measure_wide(
    shapes: list[tuple[int, int]], head: tuple[int, int], head_kernel: str, vnni_above: int | None
) -> dict[str, dict[int, tuple[float, float]]]:
    """WIDE_ROWS steps: int4 layers on their narrow path and de-quantized; an LM head on int8 (on
    ``head_kernel``) and on a bfloat16 copy."""
    g = torch.Generator().manual_seed(0)
    layers = _layer_count(shapes)
    int4_layers = _int4_layers(shapes, layers, g)
    for layer in int4_layers:
        layer.vnni_rows = vnni_above
    int8_head = Int8Linear(torch.randn(*head, generator=g) / 32)
    bf16_head = int8_head.codes.to(torch.bfloat16)
    int8_head.use_kernel(head_kernel)

    def int4_step(x: torch.Tensor, i: int, wide: int | None) -> torch.Tensor:
        int4_layers[i].wide_rows = wide
        return int4_layers[i](x)

    out: dict[str, dict[int, tuple[float, float]]] = {"layers": {}, "head": {}}
    for rows in WIDE_ROWS:
        calls = _layer_calls(shapes, layers, rows, g)
        out["layers"][rows] = tuple(
            _best_ms([lambda x, i: int4_step(x, i, None), lambda x, i: int4_step(x, i, 0)], calls)
        )
        x = [(torch.randn(rows, head[1], generator=g), 0)]
        bf16 = lambda x, i: dense_linear(x, bf16_head, None, onednn_linear_works())  # noqa: E731
        out["head"][rows] = tuple(_best_ms([lambda x, i: int8_head(x), bf16], x))
    return out
