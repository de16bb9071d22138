"""Our decode-attention kernel (``decode_attention.cpp``): built on first use, used by compiled decode steps of a
few sequences.

For one query token per sequence, the general CPU attention kernel spends most of its time on fixed costs (the
gather of the context into a contiguous copy, buffers, work splitting), not on the arithmetic: about 80-100 µs
per layer for one sequence of 256 tokens, where this kernel, reading keys and values straight from the paged
cache, takes 35-45 µs (docs/benchmarks.md, "Decode attention"). From about 8 sequences up the two are even,
and the general kernel stays in use.

The kernel is C++, compiled once per machine by torch's extension builder (a C++ compiler and ninja, which
compiled decode steps need anyway) into ``$FLEETSERVE_CACHE/kernels``, keyed by the source, torch's version and
the CPU's instruction sets (it is built for this CPU). Building takes about 30 s and runs on the compile
warm-up thread before any graph is traced, so a graph either always or never uses it. Where it cannot be built,
a warning says why and the general kernel serves; the eager path never uses it (float32 parity with
transformers rests on that path's rounding). ``FLEETSERVE_DECODE_KERNEL=off`` keeps it out (for comparisons).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cpp")
MAX_BATCH = 4
"""Decode batches of at most this many sequences use the kernel (where it measured faster)."""

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "ready": built and registered; "tried": a build was attempted


def ready() -> bool:
    """Whether ``torch.ops.fleetserve.decode_attention`` is there to call."""
    return _state.get("ready", False)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_key() -> str:
    """What the built kernel depends on: its source, torch's version and this CPU's instruction sets."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def ensure_loaded(cache_dir: Path) -> bool:
    """Build (or find built) and register the kernel, once per process; whether it is ready."""
    with _lock:
        if _state.get("tried"):
            return ready()
        _state["tried"] = True
        if os.environ.get("FLEETSERVE_DECODE_KERNEL", "").lower() in ("off", "0", "false"):
            log.info("decode-attention kernel off (FLEETSERVE_DECODE_KERNEL)")
            return False
        try:
            _load(cache_dir)
        except Exception as exc:  # no compiler, no ninja, a failed build: the general kernel serves
            log.warning("decode-attention kernel unavailable (%s); compiled steps use the general kernel", exc)
            return False
        _state["ready"] = True
        return True


def _load(cache_dir: Path) -> None:
    from torch.utils import cpp_extension

    build_dir = cache_dir / f"decode-attention-{build_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="fleetserve_decode_attention",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    _impl.impl("decode_attention", _shape_only, "Meta")
    log.info("decode-attention kernel ready (%s)", build_dir)


def _shape_only(q, kv_cache, slots, mask, scale):
    return torch.empty_like(q)


_impl = torch.library.Library("fleetserve", "IMPL")
