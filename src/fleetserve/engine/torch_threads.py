"""Where a process runs its torch work: one thread owns the parallel (OpenMP) compute.

torch's CPU kernels split their work over an OpenMP thread team, and every thread that starts parallel work gets a
team of its own. libgomp counts the threads of all teams in the process; once they outnumber the CPUs, every
team's threads stop spinning between parallel regions and sleep instead, so each of the hundreds of regions in a
decode step first has to wake a sleeping thread. A worker that loads its model on a pool thread and steps on its
engine thread runs its steps 15-20% slower than the same engine alone for that reason alone (the team's second
thread sleeps some two thousand times a second).

So an engine is built and stepped on one thread (``AsyncEngine`` builds it on its own thread), a pipeline stage's
layers likewise, and torch work beside them (loading, calibrating, reading KV for a transfer) runs on a thread that
ends when the work does (``run_on_own_thread``): its team ends with it, and the steps' team spins again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_on_own_thread(fn: Callable[[], T], name: str = "fleetserve-torch") -> T:
    """Run ``fn`` on a new thread that ends when it returns (with it, any OpenMP team it started)."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():  # the awaiting task was cancelled before the thread ran
            return
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the awaiting task, which owns the error
            done.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wrap_future(done)
