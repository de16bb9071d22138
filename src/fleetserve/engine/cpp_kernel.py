"""Building our C++ kernels: each is compiled once per machine by torch's extension builder (a C++ compiler and
ninja, which compiled decode steps need anyway) into ``$FLEETSERVE_CACHE/kernels``, keyed by its source, torch's
version and the CPU's instruction sets (it is built for this CPU), and registered as ``torch.ops.fleetserve.*``.

A kernel is optional everywhere it is used: where it cannot be built, a warning says why and the path it would
have replaced serves.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_impl = torch.library.Library("fleetserve", "IMPL")


def cpu_flags() -> str:
    """This CPU's flags line from /proc/cpuinfo ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


class CppKernel:
    """One C++ source of ours, built and registered at most once per process."""

    def __init__(self, name: str, source: Path, meta: dict[str, Callable], purpose: str):
        self.name = name
        self.source = source
        self.meta = meta
        """Per op the source defines, a function giving its output's shape (for tracing into compiled graphs)."""
        self.purpose = purpose
        """What serves instead, for the warning when it cannot be built."""
        self._lock = threading.Lock()
        self._tried = False
        self._ready = False

    def ready(self) -> bool:
        """Whether its ops are there to call."""
        return self._ready

    def build_key(self) -> str:
        """What the built kernel depends on: its source and the headers beside it, torch's version and this CPU's
        instruction sets."""
        digest = hashlib.sha256(self.source.read_bytes())
        for header in sorted(self.source.parent.glob("*.h")):
            digest.update(header.read_bytes())
        digest.update(torch.__version__.encode())
        digest.update(cpu_flags().encode())
        return digest.hexdigest()[:16]

    def ensure_loaded(self, cache_dir: Path) -> bool:
        """Build (or find built) and register the kernel, once per process; whether it is ready."""
        with self._lock:
            if self._tried:
                return self._ready
            self._tried = True
            try:
                self._load(cache_dir)
            except Exception as exc:  # no compiler, no ninja, a failed build: the path it would replace serves
                log.warning("%s kernel unavailable (%s); %s", self.name, exc, self.purpose)
                return False
            self._ready = True
            return True

    def _load(self, cache_dir: Path) -> None:
        from torch.utils import cpp_extension

        build_dir = cache_dir / f"{self.name}-{self.build_key()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=f"fleetserve_{self.name.replace('-', '_')}",
            sources=[str(self.source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        for op, shape in self.meta.items():
            _impl.impl(op, shape, "Meta")
        log.info("%s kernel ready (%s)", self.name, build_dir)
