"""Round-robin: each worker in turn, in worker-id order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class RoundRobinPolicy(Policy):
    """Cycles over the candidates sorted by worker id: each pick goes to the first worker after the previous
    pick's id (wrapping around), so with a steady set of candidates their counts never differ by more than one,
    and a worker joining or leaving only shifts where the cycle continues."""

    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None
        self.picks = 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((w for w in ordered if w.worker_id > self._last), ordered[0])
        self._last = chosen.worker_id
        self.picks += 1
        return chosen

    def describe(self) -> dict:
        return {"name": self.name, "picks": self.picks}
