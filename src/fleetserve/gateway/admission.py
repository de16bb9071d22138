"""Admission control: a request runs only where there is room for it; the rest wait in a bounded queue.

The gateway knows each healthy worker's capacity: how many sequences its engine runs at once
(``max_num_seqs``) and how many tokens its KV cache holds. Each admitted request holds a lease on one worker: a
sequence slot and a KV reservation of its prompt plus up to ``output_reserve_tokens`` of output (reserving the
whole ``max_tokens`` would leave most of the cache idle, since few answers run to their limit; the engine
preempts if it is wrong), less the prompt blocks the worker reported holding in its prefix cache (shared blocks
are not allocated again, so requests on a common prefix do not crowd each other out). A request that finds no room waits in its model's queue, ordered by priority
(smaller first) and then arrival; when the queue is full the answer is 503 with Retry-After at once. Queued
requests are placed as leases end, workers join or heartbeats report free room. A request already accepted
(a retry, or a stream resuming after its worker died) skips the queue's bound: it is never turned away.

The balancing policy chooses among the workers with room, so a request is bound to a worker as late as
possible.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.errors import CapacityError, NoWorkerError
from fleetserve.gateway.policies.base import Policy, RouteRequest
from fleetserve.gateway.policies.kv_aware import KVAwarePolicy
from fleetserve.gateway.policies.prefill_queue import PrefillQueuePolicy, cached_prompt_tokens
from fleetserve.gateway.registry import DECODE_ROLE, PREFILL_ROLE, WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 64


class QueueFullError(CapacityError):
    """The model's admission queue is full: the client should retry later (503 + Retry-After)."""


@dataclass
class Lease:
    """One admitted request's hold on a worker: a sequence slot and a KV reservation."""

    worker: WorkerRecord
    tokens: int
    queued_s: float = 0.0
    _admission: Admission | None = field(default=None, repr=False)

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self)


SHORTLIST_ABOVE = 32
"""A model with more workers than this is routed over a shortlist when its policy allows (``Policy.narrows``)."""
SHORTLIST_LIGHTEST = 8
"""The least loaded workers on a shortlist, besides those holding the prompt's start and the session's worker."""


class LoadBuckets:
    """Each model's workers by their in-flight count, the load the policies balance: the least loaded are found
    without looking at every worker. Admission moves a worker between buckets as its count changes; the whole is
    rebuilt when the registry's membership changed. Within a bucket, workers keep the order they entered it, so
    equally loaded workers take turns."""

    def __init__(self, registry: WorkerRegistry):
        self.registry = registry
        self._generation = -1
        self._buckets: dict[str, list[dict[str, WorkerRecord]]] = {}
        self._at: dict[str, int] = {}

    def _sync(self) -> None:
        if self._generation == self.registry.generation:
            return
        self._buckets, self._at = {}, {}
        for record in self.registry.workers.values():
            self._put(record)
        self._generation = self.registry.generation

    def _put(self, record: WorkerRecord) -> None:
        buckets = self._buckets.setdefault(record.info.model, [])
        while len(buckets) <= record.in_flight:
            buckets.append({})
        buckets[record.in_flight][record.worker_id] = record
        self._at[record.worker_id] = record.in_flight

    def moved(self, record: WorkerRecord) -> None:
        """``record``'s in-flight count changed."""
        if self._generation != self.registry.generation or self.registry.workers.get(record.worker_id) is not record:
            return  # the next look rebuilds from the registry (or the record has left it)
        at = self._at.get(record.worker_id)
        if at is not None:
            self._buckets[record.info.model][at].pop(record.worker_id, None)
        self._put(record)

    def lightest(self, model: str, count: int, accept: Callable[[WorkerRecord], bool]) -> list[WorkerRecord]:
        """Up to ``count`` of ``model``'s workers that ``accept`` takes, the least loaded first."""
        self._sync()
        out: list[WorkerRecord] = []
        for bucket in self._buckets.get(model, ()):
            for record in bucket.values():
                if accept(record):
                    out.append(record)
                    if len(out) == count:
                        return out
        return out


class DecisionTimes:
    """The durations of the latest ``keep`` routing decisions, for their percentiles: wall-clock time, and the CPU
    time of the thread that made them (which leaves out waits for a core and other threads' turns)."""

    def __init__(self, keep: int = 10_000):
        self._wall: deque[float] = deque(maxlen=keep)
        self._cpu: deque[float] = deque(maxlen=keep)
        self.count = 0

    def add(self, wall_s: float, cpu_s: float) -> None:
        self._wall.append(wall_s)
        self._cpu.append(cpu_s)
        self.count += 1

    @staticmethod
    def _percentiles(values: deque[float], prefix: str) -> dict[str, float]:
        ordered = sorted(values)
        if not ordered:
            return {f"{prefix}p50_us": 0.0, f"{prefix}p99_us": 0.0, f"{prefix}max_us": 0.0}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

        return {f"{prefix}p50_us": at(0.5), f"{prefix}p99_us": at(0.99), f"{prefix}max_us": round(ordered[-1] * 1e6, 1)}

    def summary(self) -> dict[str, float | int]:
        """Decisions made; the p50, p99 and max of the latest ones in microseconds, of wall-clock time and (``cpu_``)
        of the deciding thread's CPU time."""
        return {"count": self.count, **self._percentiles(self._wall, ""), **self._percentiles(self._cpu, "cpu_")}


@dataclass(order=True)
class _Ticket:
    priority: int
    seq: int
    model: str = field(compare=False)
    route: RouteRequest = field(compare=False)
    tokens: int = field(compare=False)
    avoid: frozenset[str] = field(compare=False)
    future: asyncio.Future = field(compare=False)
    enqueued: float = field(compare=False)


def _routable(record: WorkerRecord) -> bool:
    return record.routable


class Admission:
    """Per-model bounded queues in front of the workers."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policy_for: Callable[[str], Policy],
        max_queue: int = 256,
        output_reserve_tokens: int = 256,
        queue_timeout_s: float = 300.0,
    ):
        self.registry = registry
        self.policy_for = policy_for
        self.max_queue = max_queue
        self.output_reserve_tokens = output_reserve_tokens
        self.queue_timeout_s = queue_timeout_s
        self._queues: dict[str, list[_Ticket]] = {}
        self._seq = itertools.count()
        self.rejected = 0
        """Requests answered 503 because the queue was full."""
        self.pool_policies: dict[str, Policy] = {
            PREFILL_ROLE: PrefillQueuePolicy(),
            DECODE_ROLE: KVAwarePolicy(load_weight=0.6, kv_weight=0.4),
        }
        """How a disaggregated request's prefill and decode workers are chosen: by the tokens queued before its
        prompt (less what their caches hold), and by 60% load and 40% KV use."""
        self.loads = LoadBuckets(registry)
        self.decision_times = DecisionTimes()
        """How long the latest routing decisions took (finding a worker with room, or queueing)."""
        self.coming: Callable[[str], bool] = lambda model: False
        """Whether a worker for ``model`` is on its way (a pipeline being assigned): requests queue for it then,
        instead of being answered 503."""

    # -- capacity ---------------------------------------------------------------------------------------

    def tokens_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return prompt_tokens + min(max_tokens, self.output_reserve_tokens)

    @staticmethod
    def slots(worker: WorkerRecord) -> int:
        return worker.info.max_num_seqs or DEFAULT_MAX_NUM_SEQS

    @staticmethod
    def kv_tokens(worker: WorkerRecord) -> int:
        return worker.info.kv_blocks_total * (worker.info.block_size or 16)

    def has_room(self, worker: WorkerRecord, tokens: int) -> bool:
        if worker.in_flight >= self.slots(worker):
            return False
        # An idle worker takes any request the engine accepts: the engine itself refuses what can never fit.
        return worker.in_flight == 0 or worker.reserved_tokens + tokens <= self.kv_tokens(worker)

    def queued(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    # -- admission --------------------------------------------------------------------------------------

    async def acquire(
        self,
        model: str,
        route: RouteRequest,
        tokens: int,
        priority: int = 0,
        avoid: set[str] | frozenset[str] = frozenset(),
        accepted: bool = False,
    ) -> Lease:
        """A lease on a worker for this request, waiting in the queue when none has room.

        ``avoid``: workers to pass over when another has room (where an earlier attempt failed).
        ``accepted``: the request was admitted before (a retry or a resume): the queue's bound does not apply.
        Raises NoWorkerError when no worker serves the model (and none is on its way), QueueFullError when the queue
        is full.
        """
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            lease, ticket = self._admit(model, route, tokens, priority, avoid, accepted)
        finally:
            self.decision_times.add(time.perf_counter() - started, time.thread_time() - started_cpu)
        if lease is not None:
            return lease
        try:
            timeout = self.queue_timeout_s if self.queue_timeout_s > 0 else None
            lease = await asyncio.wait_for(asyncio.shield(ticket.future), timeout)
        except asyncio.TimeoutError:
            self._withdraw(ticket)
            raise CapacityError(
                f"no worker for {model!r} had room within {self.queue_timeout_s:.0f}s; retry later"
            ) from None
        except BaseException:  # the client left while waiting: give back a lease placed at the same moment
            self._withdraw(ticket)
            raise
        lease.queued_s = time.monotonic() - ticket.enqueued
        return lease

    def _admit(
        self,
        model: str,
        route: RouteRequest,
        tokens: int,
        priority: int,
        avoid: set[str] | frozenset[str],
        accepted: bool,
    ) -> tuple[Lease | None, _Ticket | None]:
        """The routing decision: a lease on a worker with room now, else the request's ticket in the queue."""
        queue = self._queues.setdefault(model, [])
        if route.pool is not None and not self.registry.any_routable(model, route.pool):
            route.pool = None  # the pool emptied since the request chose it: any worker of the model will do
        if not self.registry.any_routable(model):
            if not accepted and not self.coming(model):
                raise NoWorkerError(f"no healthy worker serves {model!r} right now; retry shortly")
        elif not queue:
            lease = self._place(model, route, tokens, frozenset(avoid))
            if lease is not None:
                return lease, None
        if not accepted and len(queue) >= self.max_queue:
            self.rejected += 1
            raise QueueFullError(f"the queue for {model!r} is full ({self.max_queue} requests waiting); retry shortly")
        ticket = _Ticket(
            priority=-(2**31) if accepted else priority,
            seq=next(self._seq),
            model=model,
            route=route,
            tokens=tokens,
            avoid=frozenset(avoid),
            future=asyncio.get_running_loop().create_future(),
            enqueued=time.monotonic(),
        )
        heapq.heappush(queue, ticket)
        self.pump(model)
        return None, ticket

    def _withdraw(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.model, [])
        if ticket in queue:
            queue.remove(ticket)
            heapq.heapify(queue)
        if ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
            ticket.future.result().release()
        elif not ticket.future.done():
            ticket.future.cancel()

    def pump(self, model: str | None = None) -> None:
        """Place queued requests, head first, while workers have room (call when capacity may have grown)."""
        for name in [model] if model is not None else list(self._queues):
            queue = self._queues.get(name, [])
            while queue:
                head = queue[0]
                if head.future.done():
                    heapq.heappop(queue)
                    continue
                lease = self._place(name, head.route, head.tokens, head.avoid)
                if lease is None:
                    break
                heapq.heappop(queue)
                head.future.set_result(lease)

    @staticmethod
    def reservation(worker: WorkerRecord, route: RouteRequest, tokens: int) -> int:
        """KV tokens the request would add on ``worker``: ``tokens`` less the prompt blocks the worker reported
        holding in its prefix cache (those are shared, not allocated again), at least one block."""
        block_size = worker.info.block_size or 16
        shared = cached_prompt_tokens(worker, route) if worker.block_hashes else 0
        return max(tokens - shared, block_size)

    def _place(self, model: str, route: RouteRequest, tokens: int, avoid: frozenset[str]) -> Lease | None:
        """A lease on a worker with room: the one ``route.prefer`` names when it has room, else the policy's pick
        (the pool's own policy for a prefill or decode pool, the model's otherwise). In a large fleet whose policy
        allows it, the policy chooses from a shortlist (:meth:`_shortlist`); when no worker on it has room, from
        every worker."""
        policy = self.pool_policies[route.pool] if route.pool in self.pool_policies else self.policy_for(model)
        if route.pool is None and policy.narrows and len(self.registry.members(model)) > SHORTLIST_ABOVE:
            lease = self._lease(self._shortlist(model, route, policy), route, tokens, avoid, policy, exact=False)
            if lease is not None:
                return lease
        return self._lease(self.registry.routable(model, route.pool), route, tokens, avoid, policy, exact=True)

    def _shortlist(self, model: str, route: RouteRequest, policy: Policy) -> list[WorkerRecord]:
        """The workers a narrowing policy would choose from: the least loaded, those holding the prompt's first
        block (by their heartbeats, or recently sent such a prompt by the policy), and the session's worker."""
        picked = {w.worker_id: w for w in self.loads.lightest(model, SHORTLIST_LIGHTEST, _routable)}
        wanted: list[str] = [route.prefer] if route.prefer else []
        for block_size in {w.info.block_size or 16 for w in picked.values()}:
            first = route.block_hashes(block_size)[:1]
            if first:
                wanted += self.registry.holders_of(first[0])
                wanted += policy.recent_holders(first[0])
        for worker_id in wanted:
            record = self.registry.workers.get(worker_id)
            if record is not None and record.info.model == model and record.routable:
                picked[worker_id] = record
        return list(picked.values())

    def _lease(
        self,
        candidates: list[WorkerRecord],
        route: RouteRequest,
        tokens: int,
        avoid: frozenset[str],
        policy: Policy,
        exact: bool,
    ) -> Lease | None:
        """The policy's pick among ``candidates`` with room (not ``avoid``-ed while others have room); with
        ``exact`` False (a shortlist) None also when only avoided workers have room, so that every worker is
        tried before an avoided one."""
        need = {w.worker_id: self.reservation(w, route, tokens) for w in candidates}
        roomy = [w for w in candidates if self.has_room(w, need[w.worker_id])]
        preferred = [w for w in roomy if w.worker_id not in avoid] or (roomy if exact else [])
        if not preferred:
            return None
        held = [w for w in preferred if w.worker_id == route.prefer]
        worker = held[0] if held else policy.pick(preferred, route)
        if worker is None:
            return None
        reserved = need[worker.worker_id]
        worker.in_flight += 1
        self.loads.moved(worker)
        worker.reserved_tokens += reserved
        policy.on_dispatch(worker, route)
        return Lease(worker, reserved, _admission=self)

    def _release(self, lease: Lease) -> None:
        worker = lease.worker
        worker.in_flight = max(0, worker.in_flight - 1)
        self.loads.moved(worker)
        worker.reserved_tokens = max(0, worker.reserved_tokens - lease.tokens)
        self.pump(worker.info.model)
