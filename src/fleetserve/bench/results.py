"""Benchmark result files: the record of the host a run ran on, its creation time, and writing the JSON."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def host_environment(**extra: Any) -> dict[str, Any]:
    """Python version, platform and CPU count, followed by ``extra`` (a benchmark's own packages and settings)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **extra,
    }


def cpu_description() -> str:
    """The CPU's model name and its widest vector extension (figures differ between AVX2 and AVX-512 machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    vector = "avx512" if "avx512f" in info else "avx2" if "avx2" in info else "no avx2"
    return f"{name} ({vector}, {os.cpu_count()} cores)"


def created_now() -> str:
    """The current UTC time in ISO format, to the second: a result's ``created`` field."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
