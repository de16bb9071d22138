"""Ties a child's life to its parent's on Linux: the child asks the kernel for a signal when its parent dies.

The parent does not do it between fork and exec (a ``preexec_fn`` runs Python in a forked copy of a process with
threads, which can crash or hang the child); it puts :data:`ENV` (its pid and the signal) in the child's
environment, and the child calls :func:`honour_parent_death` first thing: fleetserve's command line does, so every
``fleetserve`` child honours it. The kernel sends the signal when the *thread* that started the child ends, which is
the parent's death only if that thread lives as long as the process; the setting is not inherited by the child's
own children (the variable is removed from its environment).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "FLEETSERVE_EXIT_WITH_PARENT"
"""``PID:SIGNAL``: the parent whose death the child should hear of, and the signal it should get then."""
PR_SET_PDEATHSIG = 1


def parent_death_env(sig: int = signal.SIGTERM) -> dict[str, str]:
    """The environment that asks a child to get ``sig`` when this process dies."""
    return {ENV: f"{os.getpid()}:{int(sig)}"}


def honour_parent_death() -> bool:
    """Do what :data:`ENV` asks, if it is set: the signal on the parent's death, and an exit at once (code 1) when
    the parent has already gone. False where it is not set or not supported (off Linux)."""
    value = os.environ.pop(ENV, "")
    if not value or not sys.platform.startswith("linux"):
        return False
    try:
        parent, sig = (int(part) for part in value.split(":"))
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ValueError, OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died before the signal was asked for: it will never come
        os._exit(1)
    return True
