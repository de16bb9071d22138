"""KV-aware: weigh a worker's request load against how full its KV cache is, and refuse full workers.

``score = load_weight * load / max_num_seqs + kv_weight * kv_use``: both terms are fractions of what the worker
can take, so workers of different sizes compare fairly. A worker whose cache is at least ``full_threshold`` used
would have to preempt running sequences to take more, so it is refused; when every candidate is full the policy
returns None and the request waits in the model's queue until one has room.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, TieBreaker, kv_use, load

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord

DEFAULT_MAX_NUM_SEQS = 64
"""Assumed when a worker does not say how many sequences it runs at once."""


class KVAwarePolicy(Policy):
    """Lowest weighted sum of relative load and KV use, among workers below ``full_threshold``; ties take turns."""

    name = "kv-aware"

    def __init__(self, load_weight: float = 0.5, kv_weight: float = 0.5, full_threshold: float = 0.95) -> None:
        if load_weight < 0 or kv_weight < 0:
            raise ValueError("load_weight and kv_weight must be >= 0")
        if not 0 < full_threshold <= 1:
            raise ValueError("full_threshold must be in (0, 1]")
        self.load_weight = load_weight
        self.kv_weight = kv_weight
        self.full_threshold = full_threshold
        self._ties = TieBreaker()
        self.picks = 0
        self.refusals = 0

    def score(self, worker: WorkerRecord) -> float:
        max_seqs = worker.info.max_num_seqs or DEFAULT_MAX_NUM_SEQS
        return self.load_weight * load(worker) / max_seqs + self.kv_weight * kv_use(worker)

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        roomy = [w for w in candidates if kv_use(w) < self.full_threshold]
        if not roomy:
            self.refusals += 1
            return None
        self.picks += 1
        scores = {w.worker_id: self.score(w) for w in roomy}
        best = min(scores.values())
        return self._ties.choose([w for w in roomy if math.isclose(scores[w.worker_id], best, abs_tol=1e-12)])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "load_weight": self.load_weight,
            "kv_weight": self.kv_weight,
            "full_threshold": self.full_threshold,
            "picks": self.picks,
            "refusals": self.refusals,
        }
