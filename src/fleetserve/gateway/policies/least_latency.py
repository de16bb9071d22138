"""Least latency: the candidate expected to finish a request soonest, from the latencies workers report.

Each heartbeat carries a worker's moving averages of time to first token and time between tokens. The expected
latency of a request on a worker is ``ttft + itl * expected_tokens``, scaled by ``1 + load`` because the
averages were measured under whatever load the worker had and a busier worker will be slower still.

A worker that has reported no latency yet (both averages 0: it just joined, or has served nothing) cannot be
scored, so an idle one is tried first: the request it gets is what measures it. One that already has requests
on it waits for their measurement and meanwhile is scored as an average worker of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, TieBreaker, least_loaded, load

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


class LeastLatencyPolicy(Policy):
    """Smallest ``(ttft + itl * expected_tokens) * (1 + load)``; unmeasured idle workers first; ties take turns."""

    name = "least-latency"

    def __init__(self, expected_tokens: int = 128) -> None:
        if expected_tokens < 0:
            raise ValueError("expected_tokens must be >= 0")
        self.expected_tokens = expected_tokens
        self._ties = TieBreaker()
        self.picks = 0
        self.exploration_picks = 0

    def base_latency(self, worker: WorkerRecord) -> float:
        """Expected seconds for one request on the worker at the load its averages were measured under."""
        return worker.recent_first_token_s + worker.recent_inter_token_s * self.expected_tokens

    @staticmethod
    def measured(worker: WorkerRecord) -> bool:
        return worker.recent_first_token_s > 0 or worker.recent_inter_token_s > 0

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        unmeasured_idle = [w for w in candidates if not self.measured(w) and load(w) == 0]
        if unmeasured_idle:
            self.exploration_picks += 1
            return self._ties.choose(unmeasured_idle)
        measured = [w for w in candidates if self.measured(w)]
        if not measured:
            return least_loaded(candidates, self._ties)
        average = sum(self.base_latency(w) for w in measured) / len(measured)
        scores = {
            w.worker_id: (self.base_latency(w) if self.measured(w) else average) * (1 + load(w)) for w in candidates
        }
        best = min(scores.values())
        tied = [w for w in candidates if math.isclose(scores[w.worker_id], best, rel_tol=1e-9, abs_tol=1e-12)]
        return self._ties.choose(tied)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "expected_tokens": self.expected_tokens,
            "picks": self.picks,
            "exploration_picks": self.exploration_picks,
        }
