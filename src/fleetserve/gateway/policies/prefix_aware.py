"""Prefix-aware (the default): send a request where its prompt's prefix is already cached, within a load bound.

For each candidate the policy counts how many of the prompt's leading full blocks the worker is believed to
hold: a block counts when its hash is among those the worker reported in its heartbeats, or among those this
policy sent to it recently (its own routing history, which covers the time until the next heartbeat says so and
workers that do not report). The count stops at the first block that is missing, since a prefix cache can only
reuse a prefix.

Pure cache affinity has a known failure: every request sharing a popular prefix (a system prompt, say) goes to
the one worker holding it, which queues them while the others idle, until its KV cache is full. Three rules
prevent it:

* a cold prefix (best match below ``min_match_blocks``) goes to the least loaded worker, ties taking turns, so
  new prefixes spread over the fleet instead of all landing on one worker;
* the load guard: when the best-matching worker has more than ``balance_abs`` requests more than the least
  loaded one *and* more than ``balance_rel`` times as many, the request goes to the least loaded worker
  instead. That worker then learns the prefix (routing history), so a hot prefix ends up replicated on as
  many workers as its traffic needs;
* a worker whose KV cache is at least ``full_threshold`` used is never chosen while another candidate is below.

``request.predicted_cached_tokens`` is set to the chosen worker's matched blocks times its block size; the
dispatcher reports what the worker actually found through :meth:`PrefixAwarePolicy.record_actual`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest, TieBreaker, kv_use, least_loaded, load

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord

DEFAULT_BLOCK_SIZE = 16
"""Used for a worker that did not report its block size."""
DEFAULT_HISTORY_BLOCKS = 4096
"""History bound for a worker that did not report its KV cache size."""
FIRST_SENT_LIMIT = 65536
"""Distinct prompt starts remembered for :meth:`PrefixAwarePolicy.recent_holders` (least recently sent go first)."""


def _block_size(worker: WorkerRecord) -> int:
    return worker.info.block_size or DEFAULT_BLOCK_SIZE


class PrefixAwarePolicy(Policy):
    """Longest cached prefix wins, with fallbacks to least load for cold prefixes, overload and full caches."""

    name = "prefix-aware"
    narrows = True

    def __init__(
        self,
        min_match_blocks: int = 1,
        balance_abs: float = 4,
        balance_rel: float = 1.5,
        full_threshold: float = 0.95,
        history_ttl_s: float = 60.0,
        report_grace_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_match_blocks < 1:
            raise ValueError("min_match_blocks must be >= 1")
        if balance_abs < 0 or balance_rel < 1:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        if not 0 < full_threshold <= 1:
            raise ValueError("full_threshold must be in (0, 1]")
        if history_ttl_s <= 0:
            raise ValueError("history_ttl_s must be > 0")
        self.min_match_blocks = min_match_blocks
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.full_threshold = full_threshold
        self.history_ttl_s = history_ttl_s
        self.report_grace_s = report_grace_s
        self.clock = clock
        self._ties = TieBreaker()
        self._history: dict[str, OrderedDict[int, float]] = {}
        """worker id -> block hash -> when it was last sent there; least recently sent first."""
        self._first_sent: OrderedDict[int, dict[str, float]] = OrderedDict()
        """A prompt's first block hash -> worker id -> when such a prompt was last sent there (the reverse of the
        history for first blocks: where a prefix went, without asking every worker); least recently sent first."""
        self.picks = 0
        self.cache_hits = 0
        self.load_guard_fallbacks = 0
        self.cold_fallbacks = 0
        self.full_avoided = 0
        self.predicted_cached_tokens_total = 0
        self.actual_cached_tokens_total = 0
        self.predictions_recorded = 0

    # -- routing history ---------------------------------------------------------------------------------

    def _live_history(self, worker_id: str) -> OrderedDict[int, float] | None:
        """The worker's history with expired entries dropped (they are in time order, oldest first)."""
        history = self._history.get(worker_id)
        if history is None:
            return None
        cutoff = self.clock() - self.history_ttl_s
        while history:
            oldest = next(iter(history.values()))
            if oldest > cutoff:
                break
            history.popitem(last=False)
        return history

    def history_size(self, worker_id: str) -> int:
        """Block hashes remembered for the worker (unexpired)."""
        history = self._live_history(worker_id)
        return len(history) if history else 0

    def on_dispatch(self, worker: WorkerRecord, request: RouteRequest) -> None:
        hashes = request.block_hashes(_block_size(worker))
        if not hashes:
            return
        history = self._live_history(worker.worker_id)
        if history is None:
            history = self._history[worker.worker_id] = OrderedDict()
        now = self.clock()
        # Head blocks last, so that when the bound evicts part of this prompt it keeps the start, which is
        # what a match needs.
        for h in reversed(hashes):
            history[h] = now
            history.move_to_end(h)
        limit = worker.info.kv_blocks_total or worker.stats.kv_blocks_total or DEFAULT_HISTORY_BLOCKS
        while len(history) > limit:
            history.popitem(last=False)
        sent = self._first_sent.pop(hashes[0], None) or {}
        sent[worker.worker_id] = now
        self._first_sent[hashes[0]] = sent
        while len(self._first_sent) > FIRST_SENT_LIMIT:
            self._first_sent.popitem(last=False)

    def recent_holders(self, block_hash: int) -> list[str]:
        sent = self._first_sent.get(block_hash)
        if not sent:
            return []
        cutoff = self.clock() - self.history_ttl_s
        return [worker_id for worker_id, at in sent.items() if at > cutoff]

    def forget(self, worker_id: str) -> None:
        self._history.pop(worker_id, None)

    # -- choosing ----------------------------------------------------------------------------------------

    def matched_blocks(self, worker: WorkerRecord, request: RouteRequest) -> int:
        """Leading blocks of the prompt the worker is believed to hold (reported, or recently sent there)."""
        history = self._live_history(worker.worker_id) or {}
        reported = worker.block_hashes
        # Once a heartbeat newer than a routing entry (by the grace a prefill and a report take) leaves a block
        # out, the worker no longer holds it: the report wins over the gateway's memory of what it sent.
        reported_at = worker.hashes_reported_at
        stale_before = reported_at - self.report_grace_s if reported_at else float("-inf")
        matched = 0
        for h in request.block_hashes(_block_size(worker)):
            if h not in reported:
                sent = history.get(h)
                if sent is None or sent < stale_before:
                    break
            matched += 1
        return matched

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        roomy = [w for w in candidates if kv_use(w) < self.full_threshold]
        if roomy and len(roomy) < len(candidates):
            self.full_avoided += 1
        pool = roomy or list(candidates)
        matches = {w.worker_id: self.matched_blocks(w, request) for w in pool}
        best = max(matches.values())
        if best < self.min_match_blocks:
            self.cold_fallbacks += 1
            chosen = least_loaded(pool, self._ties)
        else:
            holders = [w for w in pool if matches[w.worker_id] == best]
            low = min(load(w) for w in holders)
            chosen = self._ties.choose([w for w in holders if load(w) == low])
            floor = min(load(w) for w in pool)
            if load(chosen) - floor > self.balance_abs and load(chosen) > self.balance_rel * floor:
                self.load_guard_fallbacks += 1
                lightest = [w for w in pool if load(w) == floor]
                most = max(matches[w.worker_id] for w in lightest)
                chosen = self._ties.choose([w for w in lightest if matches[w.worker_id] == most])
        matched = matches[chosen.worker_id]
        if matched:
            self.cache_hits += 1
        request.predicted_cached_tokens = matched * _block_size(chosen)
        self.predicted_cached_tokens_total += request.predicted_cached_tokens
        return chosen

    def record_actual(self, predicted: int, actual: int) -> None:
        """The worker reported ``actual`` cached prompt tokens for a request predicted at ``predicted``."""
        self.predictions_recorded += 1
        self.actual_cached_tokens_total += actual

    def describe(self) -> dict:
        return {
            "name": self.name,
            "min_match_blocks": self.min_match_blocks,
            "balance_abs": self.balance_abs,
            "balance_rel": self.balance_rel,
            "full_threshold": self.full_threshold,
            "history_ttl_s": self.history_ttl_s,
            "report_grace_s": self.report_grace_s,
            "picks": self.picks,
            "cache_hits": self.cache_hits,
            "load_guard_fallbacks": self.load_guard_fallbacks,
            "cold_fallbacks": self.cold_fallbacks,
            "full_avoided": self.full_avoided,
            "predicted_cached_tokens_total": self.predicted_cached_tokens_total,
            "actual_cached_tokens_total": self.actual_cached_tokens_total,
            "predictions_recorded": self.predictions_recorded,
        }
