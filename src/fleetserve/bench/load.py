"""Load drivers of the HTTP benchmark: the closed and open loops that send a level's requests, and the Load level."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fleetserve.bench.traces import StreamTrace

Send = Callable[[int, StreamTrace], Awaitable[None]]
"""Sends request number i and fills its trace; must not raise for a failed request."""


async def _guarded(send: Send, index: int, trace: StreamTrace) -> None:
    try:
        await send(index, trace)
    except Exception as exc:  # a load generator records any failure of one request and goes on with the others
        trace.fail(f"{type(exc).__name__}: {exc}")


async def closed_loop(send: Send, traces: Sequence[StreamTrace], concurrency: int) -> float:
    """Send every trace's request keeping ``concurrency`` in flight; return the wall time in seconds."""
    pending = iter(range(len(traces)))

    async def lane() -> None:
        for index in pending:  # one shared iterator: each lane takes the next request when it is free
            await _guarded(send, index, traces[index])

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(traces)))))
    return time.perf_counter() - start


async def open_loop(send: Send, traces: Sequence[StreamTrace], rate: float, rng: random.Random) -> float:
    """Send the requests at Poisson arrivals of ``rate`` per second (the first at once); return the wall time."""
    start = time.perf_counter()
    due = 0.0
    tasks = []
    for index, trace in enumerate(traces):
        if index:
            due += rng.expovariate(rate)
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_guarded(send, index, trace)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Load:
    """One load level: a closed loop at ``concurrency`` or an open loop at ``rate`` requests/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        """``c=4`` or ``rate=2.5/s``, as in the row names."""
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"

    async def drive(self, send: Send, traces: Sequence[StreamTrace], rng: random.Random) -> float:
        """Send every trace's request under this load; return the wall time in seconds."""
        if self.concurrency is not None:
            return await closed_loop(send, traces, self.concurrency)
        assert self.rate is not None
        return await open_loop(send, traces, self.rate, rng)
