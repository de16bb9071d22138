"""Dynamic batching of embedding inputs: per-model queues, when a batch is due, and the thread that runs it.

``BatchQueue`` is pure and clock-free: it holds the queued inputs of every key (model) and decides which batch is
due at a given time. ``DynamicBatcher`` is its asyncio front end: it runs due batches, one at a time, on one
long-lived compute thread (``torch_threads`` says why torch work stays on one thread) and hands each request
its results in input order.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetserve.errors import FleetServeError, InvalidRequestError

log = logging.getLogger(__name__)


class BatcherClosedError(FleetServeError):
    """The batcher was closed before the request's inputs ran."""


@dataclass(frozen=True)
class BatchPolicy:
    """When a queue of inputs becomes a batch."""

    max_batch_size: int = 32
    """Inputs per batch, at most."""
    max_queue_delay_s: float = 0.005
    """The oldest queued input of a model waits at most this long for company before its batch runs."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Sizes worth running at once: when a model's queue can fill one, the largest it can fill runs without
    waiting for the delay."""
    max_batch_tokens: int = 0
    """Padded tokens (batch size x longest input) per batch, at most; 0: no cap beyond ``max_batch_size``.
    An input longer than the cap runs alone."""
    adaptive_delay: bool = False
    """Wait for company only when it is likely to come: while a model's requests arrive further apart than
    ``max_queue_delay_s`` (a moving average of the gaps), its inputs run as soon as they can, so a lightly loaded
    batcher answers as fast as one that never waits; closer together, the delay applies."""

    def __post_init__(self) -> None:
        sizes_ok = all(1 <= s <= self.max_batch_size for s in self.preferred_batch_sizes)
        for ok, name, rule in (
            (self.max_batch_size >= 1, "max_batch_size", "must be >= 1"),
            (self.max_queue_delay_s >= 0, "max_queue_delay_s", "must be >= 0"),  # NaN fails too
            (sizes_ok, "preferred_batch_sizes", f"must lie in 1..max_batch_size ({self.max_batch_size})"),
            (self.max_batch_tokens >= 0, "max_batch_tokens", "must be >= 0 (0: no cap)"),
        ):
            if not ok:
                raise InvalidRequestError(f"{name} {rule}, got {getattr(self, name)!r}", name)


class Ticket:
    """One ``BatchQueue.add``: its key and its results in input order, filled in as its batches finish."""

    __slots__ = ("key", "results", "missing", "waited_s", "run_s", "batches")

    def __init__(self, key: str, size: int):
        self.key = key
        self.results: list[Any] = [None] * size
        self.missing = size
        """Inputs without a result yet."""
        self.waited_s = 0.0
        """The longest any of its inputs waited in the queue."""
        self.run_s = 0.0
        """The run time of the batches its inputs ran in, summed."""
        self.batches = 0
        """The batches its inputs ran in."""


@dataclass(eq=False)
class _Queued:
    ids: list[int]
    arrival: float
    seq: int  # global arrival order: breaks ties between equal times
    ticket: Ticket
    index: int  # which of the ticket's inputs


def _order(entry: _Queued) -> tuple[float, int]:
    return entry.arrival, entry.seq


@dataclass
class Batch:
    """Inputs of one key that run together; ``owners[i]`` is the ticket and input index of ``inputs[i]``."""

    key: str
    inputs: list[list[int]]
    waited_s: list[float]
    """Each input's time in the queue."""
    tokens: int
    """Real tokens."""
    padded_tokens: int
    """``len(inputs) * longest``: what a padded forward pass computes."""
    owners: list[tuple[Ticket, int]] = field(repr=False)


GAP_WEIGHT = 0.5
"""The newest gap's weight in the moving average of the gaps between a model's requests."""


class BatchQueue:
    """The queued inputs of every key and the decision when and what to run; times are passed in.

    A key is due when its oldest input has waited ``max_queue_delay_s``, when its batch is full (``max_batch_size``
    inputs, or no input as long as its longest fits under ``max_batch_tokens``), or when it can fill a preferred
    size. Of the due keys, the one with the oldest input goes first. A batch is seeded with that oldest input (so
    nothing starves) and filled with the key's inputs closest in length to it, ties oldest first: similar lengths
    share a batch and pad little. Inputs left over keep their arrival times.
    """

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._queues: dict[str, list[_Queued]] = {}  # key -> inputs in (arrival, seq) order, never empty
        self._seq = itertools.count()
        self._count = 0
        self._last_arrival: dict[str, float] = {}  # key -> when its latest request came
        self._gap: dict[str, float] = {}  # key -> moving average of the gaps between its requests
        # the fewest inputs that can be due before the delay without a token cap
        self._min_fill = min((*policy.preferred_batch_sizes, policy.max_batch_size))

    def __len__(self) -> int:
        return self._count

    def add(self, key: str, inputs: list[list[int]], now: float) -> Ticket:
        """Queue a request's inputs for ``key``, arrived at ``now``."""
        ticket = Ticket(key, len(inputs))
        if inputs:
            last = self._last_arrival.get(key)
            if last is not None:
                gap = max(0.0, now - last)
                self._gap[key] = gap if key not in self._gap else (1 - GAP_WEIGHT) * self._gap[key] + GAP_WEIGHT * gap
            self._last_arrival[key] = now
            entries = self._queues.setdefault(key, [])
            for index, ids in enumerate(inputs):
                bisect.insort(entries, _Queued(ids, now, next(self._seq), ticket, index), key=_order)
            self._count += len(inputs)
        return ticket

    def discard(self, ticket: Ticket) -> int:
        """Drop the ticket's inputs that are still queued (cancelled or failed); returns how many."""
        entries = self._queues.get(ticket.key, [])
        return self._keep(ticket.key, [e for e in entries if e.ticket is not ticket])

    def clear(self) -> list[Ticket]:
        """Drop every queued input; returns the tickets that had any, each once."""
        tickets = {e.ticket: None for entries in self._queues.values() for e in entries}  # ordered set
        self._queues.clear()
        self._count = 0
        return list(tickets)

    def next_due(self) -> float | None:
        """When the next batch falls due on delay (None when nothing is queued); one may be due earlier on size."""
        if not self._queues:
            return None
        return min(entries[0].arrival + self._delay(key) for key, entries in self._queues.items())

    def _delay(self, key: str) -> float:
        """How long ``key``'s oldest input may wait: the policy's delay, or none while company is unlikely."""
        delay = self.policy.max_queue_delay_s
        if self.policy.adaptive_delay and self._gap.get(key, 0.0) > delay:
            return 0.0
        return delay

    def take(self, now: float) -> Batch | None:
        """Remove and return a batch that is due at ``now``, or None."""
        policy = self.policy
        for key in sorted(self._queues, key=lambda k: _order(self._queues[k][0])):
            entries = self._queues[key]
            # the same sum as next_due, so a wake-up at next_due() finds the batch due
            delayed = now >= entries[0].arrival + self._delay(key)
            if not delayed and not policy.max_batch_tokens and len(entries) < self._min_fill:
                continue
            chosen, full = self._select(entries)
            if not (delayed or full):
                fill = max((s for s in policy.preferred_batch_sizes if s <= len(chosen)), default=0)
                if not fill:
                    continue
                chosen = chosen[:fill]  # the closest in length to the seed come first
            return self._pop(key, chosen, now)
        return None

    def _select(self, entries: list[_Queued]) -> tuple[list[_Queued], bool]:
        """The batch seeded with the oldest entry, filled by closeness in length; and whether it is full."""
        policy = self.policy
        seed = entries[0]
        # a stable sort: equally close entries stay oldest first
        others = sorted(entries[1:], key=lambda e: abs(len(e.ids) - len(seed.ids)))
        chosen, longest = [seed], len(seed.ids)
        for entry in others:
            if len(chosen) == policy.max_batch_size:
                break
            wider = max(longest, len(entry.ids))
            if policy.max_batch_tokens and (len(chosen) + 1) * wider > policy.max_batch_tokens:
                continue  # a farther but shorter entry may still fit
            chosen.append(entry)
            longest = wider
        # full: waiting cannot make it bigger, as not even an input no longer than its longest would fit
        full = len(chosen) == policy.max_batch_size or (
            policy.max_batch_tokens > 0 and (len(chosen) + 1) * max(longest, 1) > policy.max_batch_tokens
        )
        return chosen, full

    def _keep(self, key: str, kept: list[_Queued]) -> int:
        """Leave only ``kept`` (in order) of the key's queue; returns how many inputs left it."""
        dropped = len(self._queues.get(key, ())) - len(kept)
        if kept:
            self._queues[key] = kept
        elif key in self._queues:
            del self._queues[key]
        self._count -= dropped
        return dropped

    def _pop(self, key: str, chosen: list[_Queued], now: float) -> Batch:
        taken = set(map(id, chosen))
        self._keep(key, [e for e in self._queues[key] if id(e) not in taken])
        chosen.sort(key=_order)  # a request's inputs run in their order
        longest = max(len(e.ids) for e in chosen)
        return Batch(
            key=key,
            inputs=[e.ids for e in chosen],
            waited_s=[now - e.arrival for e in chosen],
            tokens=sum(len(e.ids) for e in chosen),
            padded_tokens=len(chosen) * longest,
            owners=[(e.ticket, e.index) for e in chosen],
        )


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a DynamicBatcher."""

    queued_inputs: int
    running_inputs: int
    batches_run: int
    inputs_run: int


@dataclass(frozen=True)
class _Failed:
    """An input's outcome when ``run`` raised for it alone."""

    error: BaseException


def run_isolating(run: Callable[[list[list[int]]], Sequence[Any]], inputs: list[list[int]]) -> list[Any]:
    """``run(inputs)``, one outcome per input; when it raises, the halves run again until each failure is one
    input's (a ``_Failed``), so one bad input costs its batch about 2 log2(n) extra runs."""
    try:
        out = run(inputs)
        if len(out) != len(inputs):
            raise RuntimeError(f"the batch function returned {len(out)} results for {len(inputs)} inputs")
        return list(out)
    except Exception as exc:
        if len(inputs) == 1:
            return [_Failed(exc)]
        mid = len(inputs) // 2
        return run_isolating(run, inputs[:mid]) + run_isolating(run, inputs[mid:])


class DynamicBatcher:
    """Runs BatchQueue batches with ``run`` on one dedicated compute thread; asyncio front end.

    Create it inside the event loop that submits to it. ``run(inputs)`` returns one result per input (a tensor's
    rows will do) and runs on the batcher's thread only, one batch at a time: inputs submitted meanwhile queue up
    for the next batch, which is formed when the thread is free. An input for which ``run`` raises fails its own
    request only, with that exception. ``on_batch(batch, run_seconds)`` is called on the loop after each batch.
    """

    def __init__(
        self,
        run: Callable[[list[list[int]]], Sequence[Any]],
        policy: BatchPolicy,
        *,
        on_batch: Callable[[Batch, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._run = run
        self._on_batch = on_batch
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._queue = BatchQueue(policy)
        self._waiters: dict[Ticket, asyncio.Future[list[Any]]] = {}
        self._running: Batch | None = None
        self._batches_run = 0
        self._inputs_run = 0
        self._closed = False
        self._wake = asyncio.Event()
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="fleetserve-batcher", daemon=True)
        self._thread.start()
        self._driver = self._loop.create_task(self._drive(), name="fleetserve-batcher")

    async def submit(self, key: str, inputs: list[list[int]]) -> list[Any]:
        """Run ``inputs`` (token id lists) for model ``key``; their results in input order.

        Cancelling the call drops its inputs that have not run yet."""
        return (await self.submit_ticket(key, inputs)).results

    async def submit_ticket(self, key: str, inputs: list[list[int]]) -> Ticket:
        """As :meth:`submit`, but the whole ticket: the results, and how long the inputs waited and ran."""
        if self._closed:
            raise BatcherClosedError("the batcher is closed")
        ticket = self._queue.add(key, inputs, self._clock())
        if not inputs:
            return ticket
        done = self._loop.create_future()
        self._waiters[ticket] = done
        self._wake.set()
        try:
            await done
            return ticket
        finally:
            del self._waiters[ticket]
            self._queue.discard(ticket)  # cancelled: its inputs need not run (none are queued otherwise)

    @property
    def alive(self) -> bool:
        """Open, with its compute thread running."""
        return not self._closed and self._thread.is_alive()

    def stats(self) -> BatcherStats:
        """Queued and running inputs now, batches and inputs run so far."""
        running = len(self._running.inputs) if self._running else 0
        return BatcherStats(len(self._queue), running, self._batches_run, self._inputs_run)

    async def close(self) -> None:
        """Fail the queued requests with BatcherClosedError, let the running batch finish, stop the thread."""
        if not self._closed:
            self._closed = True
            error = BatcherClosedError("the batcher closed before the request ran")
            for ticket in self._queue.clear():
                self._settle(ticket, error)
            self._wake.set()
            await self._driver
            self._jobs.put(None)
        # the running batch's results were posted to the loop before the thread ended, so they arrive first
        await asyncio.to_thread(self._thread.join)

    async def _drive(self) -> None:
        """Hand due batches to the thread, one at a time; sleep until the next is due or something changes."""
        while not self._closed:
            self._wake.clear()
            delay = None
            if self._running is None:
                now = self._clock()
                batch = self._queue.take(now)
                if batch is not None:
                    self._running = batch
                    self._jobs.put(batch)
                    continue
                due = self._queue.next_due()
                if due is not None:
                    delay = max(0.0, due - now)
            timer = self._loop.call_later(delay, self._wake.set) if delay is not None else None
            try:
                await self._wake.wait()  # a submission, a finished batch, close, or the timer
            finally:
                if timer is not None:
                    timer.cancel()

    def _work(self) -> None:
        """The compute thread: every call of ``run`` happens here."""
        while (batch := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                outcomes = run_isolating(self._run, batch.inputs)
            except BaseException as exc:  # not an Exception (SystemExit ...): the batch fails, the thread goes on
                outcomes = [_Failed(exc)] * len(batch.inputs)
            took = time.perf_counter() - start
            try:
                self._loop.call_soon_threadsafe(self._finish, batch, outcomes, took)
            except RuntimeError:  # the loop is closed: nobody waits for results any more
                return

    def _finish(self, batch: Batch, outcomes: list[Any], took: float) -> None:
        """On the loop: deliver a batch's outcomes to their requests and wake the driver for the next batch."""
        self._running = None
        self._batches_run += 1
        self._inputs_run += len(batch.inputs)
        for ticket in {ticket for ticket, _ in batch.owners}:
            ticket.run_s += took
            ticket.batches += 1
        for (ticket, index), outcome, waited in zip(batch.owners, outcomes, batch.waited_s):
            ticket.waited_s = max(ticket.waited_s, waited)
            if isinstance(outcome, _Failed):
                self._settle(ticket, outcome.error)
            else:
                ticket.results[index] = outcome
                ticket.missing -= 1
                if not ticket.missing:
                    self._settle(ticket)
        self._wake.set()
        if self._on_batch is not None:
            try:
                self._on_batch(batch, took)
            except Exception:  # metrics must not stop the batching
                log.exception("on_batch failed")

    def _settle(self, ticket: Ticket, error: BaseException | None = None) -> None:
        """Answer the ticket's request with its results or ``error``; a failed request's queued inputs are dropped."""
        done = self._waiters.get(ticket)
        if done is None or done.done():  # cancelled, or failed by an earlier input
            return
        if error is None:
            done.set_result(ticket.results)
        else:
            self._queue.discard(ticket)
            done.set_exception(error)
