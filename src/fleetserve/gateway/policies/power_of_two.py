"""Power of two choices: sample two candidates at random, send to the less loaded of them.

Nearly as even as least-connections, but it needs no global minimum and, with several gateways sharing the same
workers, it does not make them all pile onto the same least-loaded worker at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, kv_use, load

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class PowerOfTwoPolicy(Policy):
    """Two distinct random candidates; the one with lower load wins, then the one with lower KV use (then the
    first one sampled). ``last_pair`` holds the ids of the two sampled by the latest pick."""

    name = "power-of-two"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self.last_pair: tuple[str, ...] = ()
        self.picks = 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        if len(candidates) == 1:
            self.last_pair = (candidates[0].worker_id,)
            return candidates[0]
        first, second = self._rng.sample(sorted(candidates, key=lambda w: w.worker_id), 2)
        self.last_pair = (first.worker_id, second.worker_id)
        if (load(second), kv_use(second)) < (load(first), kv_use(first)):
            return second
        return first

    def describe(self) -> dict:
        return {"name": self.name, "seed": self.seed, "picks": self.picks}
