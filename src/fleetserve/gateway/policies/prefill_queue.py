"""Prefill queue: the worker that will start computing this prompt soonest, counting what its cache already holds.

``cost = reserved_tokens + (prompt tokens - prompt tokens the worker's prefix cache holds)``: the tokens already
admitted to the worker (prompts and their output reserve, admission's count) plus the part of this prompt it would
have to compute. A prefill worker's time goes to computing prompts, so the lowest cost comes first; ties take
turns. The default policy of a model's prefill pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, TieBreaker

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord


def cached_prompt_tokens(worker: WorkerRecord, request: RouteRequest) -> int:
    """Prompt tokens at the start of ``request`` whose blocks the worker reported holding."""
    block_size = worker.info.block_size or 16
    held = 0
    for h in request.block_hashes(block_size):
        if h not in worker.block_hashes:
            break
        held += block_size
    return held


class PrefillQueuePolicy(Policy):
    """Fewest tokens to compute before and for this prompt; ties take turns."""

    name = "prefill-queue"

    def __init__(self) -> None:
        self._ties = TieBreaker()
        self.picks = 0

    def cost(self, worker: WorkerRecord, request: RouteRequest) -> int:
        todo = max(0, len(request.prompt_token_ids) - cached_prompt_tokens(worker, request))
        return worker.reserved_tokens + todo

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        costs = {w.worker_id: self.cost(w, request) for w in candidates}
        best = min(costs.values())
        return self._ties.choose([w for w in candidates if costs[w.worker_id] == best])

    def describe(self) -> dict:
        return {"name": self.name, "picks": self.picks}
