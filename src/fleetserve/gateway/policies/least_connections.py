"""Least connections: the candidate with the fewest requests on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, TieBreaker, least_loaded

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class LeastConnectionsPolicy(Policy):
    """Smallest :func:`~fleetserve.gateway.policies.base.load`; equally loaded workers take turns."""

    name = "least-connections"
    narrows = True

    def __init__(self) -> None:
        self._ties = TieBreaker()
        self.picks = 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        return least_loaded(candidates, self._ties)

    def describe(self) -> dict:
        return {"name": self.name, "picks": self.picks}
