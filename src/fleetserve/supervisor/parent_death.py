"""Ties a child's life to its parent's on Linux: PR_SET_PDEATHSIG, set between fork and exec.

The kernel sends the signal when the *thread* that forked the child ends, which is the parent's death only if that
thread lives as long as the process; the setting survives exec but is not inherited by the child's own children.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the parent (so the forked child only calls it); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def exit_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent dies; None where that is not supported.

    If the parent has already died by the time the child sets this up, the child exits at once (code 1)."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        if os.getppid() != parent:  # it died between fork and prctl: the signal will never come
            os._exit(1)

    return preexec
