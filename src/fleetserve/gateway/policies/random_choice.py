"""Random: a uniformly random candidate (seedable, for reproducible tests and benchmarks)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class RandomPolicy(Policy):
    """Chooses uniformly among the candidates (taken in worker-id order, so a seed gives the same picks)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self.picks = 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        return self._rng.choice(sorted(candidates, key=lambda w: w.worker_id))

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "picks": self.picks}
