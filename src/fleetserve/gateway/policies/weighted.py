"""Weighted: round-robin in proportion to each worker's capacity (its KV cache size, in blocks).

Smooth weighted round-robin: every pick, each candidate's credit grows by its weight; the candidate with the most
credit is chosen and pays back the sum of the weights. It is deterministic, the shares follow the weights
exactly over each cycle, and a big worker's picks are interleaved with the others' rather than sent in a burst.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, capacity

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class WeightedPolicy(Policy):
    """Each worker's share of picks is proportional to :func:`~fleetserve.gateway.policies.base.capacity`."""

    name = "weighted"

    def __init__(self) -> None:
        self._credit: dict[str, int] = {}
        self.picks = 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        total = 0
        for w in candidates:
            weight = capacity(w)
            total += weight
            self._credit[w.worker_id] = self._credit.get(w.worker_id, 0) + weight
        chosen = max(sorted(candidates, key=lambda w: w.worker_id), key=lambda w: self._credit[w.worker_id])
        self._credit[chosen.worker_id] -= total
        return chosen

    def forget(self, worker_id: str) -> None:
        self._credit.pop(worker_id, None)

    def describe(self) -> dict:
        return {"name": self.name, "picks": self.picks}
