"""Process memory of a benchmark run: this process's peak resident set size, and resetting it before a run."""

from __future__ import annotations

import sys

MiB = 1024 * 1024


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """The peak resident set size of process ``pid`` (this process when None): VmHWM from /proc, else, for this
    process, getrusage (None if neither works).

    VmHWM belongs to the process's current address space, so a subprocess does not inherit its parent's figure
    (getrusage's ru_maxrss can, across fork and exec).
    """
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid is not None:
        return None
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write 5 to /proc/self/clear_refs); True if that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
