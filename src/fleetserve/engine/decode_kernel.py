"""Our decode-attention kernel (``decode_attention.cpp``): reads keys and values straight from the paged cache for
compiled decode steps of a few sequences. Off unless ``FLEETSERVE_DECODE_KERNEL=on``.

Called alone it is 1.3-3.5x faster than the general path (gather each sequence's context into a contiguous copy,
then ``scaled_dot_product_attention``) at 1-4 sequences; but inside a compiled step, in alternating runs, a
step took as long with it as without (1 sequence at 250-450 tokens of context: 13.8 and 13.1 ms against 12.5
and 13.2; at 700-850: 14.9 and 14.7 against 14.4 and 14.2; ``benchmarks/decode_attention.py``,
docs/benchmarks.md). So it is not on by default: building it costs start-up time and it needs a compiler. It is
the base for a faster one (several keys to a vector's lanes, a vectorized exp).

The kernel is C++, compiled once per machine by torch's extension builder (a C++ compiler and ninja, which
compiled decode steps need anyway) into ``$FLEETSERVE_CACHE/kernels``, keyed by the source, torch's version and
the CPU's instruction sets (it is built for this CPU). When asked for, it is built on the compile warm-up thread
before any graph is traced, so a graph either always or never uses it. Where it cannot be built, a warning says
why and the general path serves; the eager path never uses it (float32 parity with transformers rests on that
path's rounding).
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


ENV = "FLEETSERVE_DECODE_KERNEL"


def wanted() -> bool:
    """Whether this process is asked to use the kernel (``FLEETSERVE_DECODE_KERNEL=on``)."""
    return os.environ.get(ENV, "").lower() in ("on", "1", "true")


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
