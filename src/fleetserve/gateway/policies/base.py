"""The interface every balancing policy implements, and the load measures they share.

A policy sees only workers that are healthy, serve the request's model and have room (admission filters them
first), and returns one of them, or None when it refuses them all (kv-aware refuses workers whose cache is
full); the request then waits in the model's queue.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from fleetserve.contract import block_hashes

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


@dataclass
class RouteRequest:
    """What a policy may know about a request."""

    model: str
    request_id: str = ""
    prompt_token_ids: Sequence[int] = ()
    affinity_key: str | None = None
    """The `user` field or the session header, when the client sent one (consistent hashing uses it)."""
    predicted_cached_tokens: int = 0
    """Set by prefix-aware: prompt tokens it expects the chosen worker to find in its prefix cache."""
    pool: str | None = None
    """Route among the workers of this role only ("prefill" or "decode" for a disaggregated request); None: any."""
    prefer: str | None = None
    """A worker id to take when it has room (the one holding the request's session), before any policy."""
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_size: int) -> list[int]:
        """The engine's chained hashes of the prompt's full blocks (computed once per block size)."""
        if block_size not in self._hashes:
            self._hashes[block_size] = block_hashes(self.prompt_token_ids, block_size)
        return self._hashes[block_size]


def load(worker: WorkerRecord) -> int:
    """Requests on a worker: the gateway's own count of the requests it has in flight there. The worker's reported
    running + waiting is not used: it is up to a heartbeat old, and a request that finished since would keep
    steering work away from an idle worker (this gateway's own count is exact and current)."""
    return worker.in_flight


def kv_use(worker: WorkerRecord) -> float:
    """Fraction of the worker's KV blocks in use by running sequences, from its last heartbeat (0..1)."""
    total = worker.stats.kv_blocks_total or worker.info.kv_blocks_total
    return worker.stats.kv_blocks_used / total if total else 0.0


def capacity(worker: WorkerRecord) -> int:
    """How much a worker can hold, in KV blocks (what `weighted` balances by)."""
    return max(1, worker.info.kv_blocks_total or worker.stats.kv_blocks_total)


class Policy(ABC):
    """Chooses one worker among candidates for a request."""

    name: ClassVar[str]
    narrows: ClassVar[bool] = False
    """The policy always chooses among the least loaded workers or those holding the start of the request's prompt
    (reported by heartbeats, or in :meth:`recent_holders`): in a large fleet admission shows it only those
    (a shortlist) instead of every worker. Policies that need every worker (turns, hashing, weights) say False."""

    @abstractmethod
    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        """One of ``candidates`` (never empty), or None to refuse them all."""

    def on_dispatch(self, worker: WorkerRecord, request: RouteRequest) -> None:  # noqa: B027 (optional hook)
        """The request was sent to ``worker`` (policies that learn from their own routing record it here)."""

    def record_actual(self, predicted: int, actual: int) -> None:  # noqa: B027 (optional hook)
        """The worker found ``actual`` prompt tokens in its prefix cache where the policy had predicted ``predicted``
        (``request.predicted_cached_tokens`` at pick time); policies that predict cache hits keep score here."""

    def recent_holders(self, block_hash: int) -> Iterable[str]:
        """Ids of the workers this policy recently sent a prompt starting with ``block_hash`` (its first full
        block) to, that the workers' heartbeats may not list yet."""
        return ()

    def forget(self, worker_id: str) -> None:  # noqa: B027 (optional hook)
        """The worker left the fleet: drop whatever the policy keeps about it."""

    def describe(self) -> dict:
        """The policy's name, settings and counters, for the admin API and metrics."""
        return {"name": self.name}


class TieBreaker:
    """Spreads ties: among equally good workers, the one this tie-breaker chose least recently (never chosen
    first, then by id), so a fixed set of equals takes turns and a worker that joins a set of equals goes soon."""

    def __init__(self, remember: int = 100_000) -> None:
        self._turn = itertools.count()
        self._chosen: OrderedDict[str, int] = OrderedDict()
        """worker id -> the turn it was last chosen at; least recent first, at most ``remember`` of them."""
        self.remember = remember

    def choose(self, workers: Sequence[WorkerRecord]) -> WorkerRecord:
        chosen = self._chosen
        pick = min(workers, key=lambda w: (chosen.get(w.worker_id, -1), w.worker_id))
        chosen.pop(pick.worker_id, None)
        chosen[pick.worker_id] = next(self._turn)
        if len(chosen) > self.remember:
            chosen.popitem(last=False)
        return pick


def least_loaded(candidates: Sequence[WorkerRecord], ties: TieBreaker) -> WorkerRecord:
    """The candidate with the fewest requests; ties spread by ``ties``."""
    low = min(load(w) for w in candidates)
    return ties.choose([w for w in candidates if load(w) == low])
