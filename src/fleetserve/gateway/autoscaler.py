"""Autoscaling: a deployment's replica count follows its load, within its min and max.

A deployment with an ``autoscale`` mapping is scaled on three signals, read every second:

- **queue depth**: requests waiting for its workers (the gateway's queue for the model plus what its workers hold
  waiting), per serving worker, against ``queue_per_replica``;
- **KV use**: the mean share of its workers' KV cache in use, against ``kv_usage``;
- **TTFT p90**: the 90th percentile of time to first token over the last ``window_s`` seconds, from the gateway's
  ``fleetserve_time_to_first_token_seconds`` histogram, against ``ttft_p90_s`` (0: not used; the model's, since
  every role serves the same requests; only while requests are in flight or queued, since the window's figure
  outlives them; not read with ``--no-telemetry``).

One signal over its threshold for ``up_after_s`` adds a worker (none while an earlier one is still loading, and
not within ``up_cooldown_s`` of the last change). Every signal under half its threshold (the hysteresis that keeps
it from flapping) for ``down_after_s`` takes one away (not within ``down_cooldown_s``); no request at all for
``idle_after_s`` goes straight to ``min_replicas``. Each decision is logged with its reason, kept (the latest
ones, in the deployment's status) and counted in ``fleetserve_autoscale_decisions_total``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.registry import REPLICA_ROLE, WorkerState

log = logging.getLogger(__name__)

DECISIONS_KEPT = 50


@dataclass(frozen=True)
class AutoscalePolicy:
    queue_per_replica: float = 4.0
    kv_usage: float = 0.85
    ttft_p90_s: float = 0.0
    window_s: float = 30.0
    up_after_s: float = 5.0
    down_after_s: float = 60.0
    idle_after_s: float = 120.0
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 60.0

    @classmethod
    def parse(cls, data: Any) -> AutoscalePolicy:
        """From a deployment's ``autoscale`` mapping (true: the defaults); InvalidRequestError names a bad key."""
        if data is True:
            return cls()
        if not isinstance(data, dict):
            raise InvalidRequestError("deployment.autoscale must be a mapping of its settings (or true)", "autoscale")
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise InvalidRequestError(
                    f"unknown autoscale key {key!r}; valid: {', '.join(sorted(known))}", f"autoscale.{key}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise InvalidRequestError(f"autoscale.{key} must be a number >= 0, not {value!r}", f"autoscale.{key}")
        policy = cls(**{k: float(v) for k, v in data.items()})
        if policy.queue_per_replica <= 0 or not 0 < policy.kv_usage <= 1 or policy.window_s <= 0:
            raise InvalidRequestError(
                "autoscale needs queue_per_replica > 0, kv_usage in (0, 1] and window_s > 0", "autoscale"
            )
        return policy

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Signals:
    """One reading of a deployment's load."""

    serving: int
    queued: int
    """Requests waiting: in the gateway's queue for the model and in its workers' engines."""
    in_flight: int
    kv_usage: float
    ttft_p90_s: float | None
    """None when no request had its first token within the window."""

    def to_json(self) -> dict:
        return asdict(self)


class TtftWindow:
    """TTFT p90 per model over a sliding window, from the cumulative buckets of a Prometheus histogram."""

    def __init__(self, histogram: Any, clock: Callable[[], float]):
        self.histogram = histogram
        self.clock = clock
        self._snapshots: dict[str, deque[tuple[float, list[tuple[float, float]]]]] = {}

    def _buckets(self, model: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of the model's histogram now; empty when it has none."""
        out = []
        collect = getattr(self.histogram, "collect", None)  # none when telemetry is off
        for metric in collect() if collect is not None else ():
            for sample in metric.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("model") == model:
                    out.append((float(sample.labels["le"]), sample.value))
        return sorted(out)

    def p90(self, model: str, window_s: float) -> float | None:
        now, buckets = self.clock(), self._buckets(model)
        history = self._snapshots.setdefault(model, deque())
        history.append((now, buckets))
        while len(history) > 1 and history[1][0] <= now - window_s:
            history.popleft()
        old = dict(history[0][1]) if history[0][0] <= now - window_s else {}
        counts = [(bound, count - old.get(bound, 0.0)) for bound, count in buckets]
        total = counts[-1][1] if counts else 0.0
        if total <= 0:
            return None
        # As Prometheus' histogram_quantile: linear within the bucket that holds the 90th percentile.
        target, below, lower = 0.9 * total, 0.0, 0.0
        for bound, count in counts:
            if count >= target:
                if bound == float("inf"):
                    return lower
                return lower + (bound - lower) * (target - below) / (count - below) if count > below else bound
            below, lower = count, bound
        return lower


@dataclass
class _State:
    hot_since: float | None = None
    cold_since: float | None = None
    idle_since: float | None = None
    changed_at: float = float("-inf")


class Autoscaler:
    """Sets the replicas of the deployments that have an ``autoscale`` policy (see the module docstring)."""

    def __init__(self, controller, admission, metrics, clock: Callable[[], float] = time.monotonic):
        self.controller = controller
        self.admission = admission
        self.metrics = metrics
        self.clock = clock
        self.ttft = TtftWindow(metrics.time_to_first_token_seconds, clock)
        self.decisions: deque[dict] = deque(maxlen=DECISIONS_KEPT)
        self.last_signals: dict[tuple[str, str], Signals] = {}
        self._states: dict[tuple[str, str], _State] = {}

    def signals(self, deployment, policy: AutoscalePolicy) -> Signals:
        role = deployment.role
        records = [
            r
            for r in self.controller.registry.workers.values()
            if r.info.model == deployment.model
            and (r.info.role or REPLICA_ROLE) == role
            and r.state == WorkerState.HEALTHY
        ]
        totals = [(r.stats.kv_blocks_used, r.stats.kv_blocks_total or r.info.kv_blocks_total) for r in records]
        kv = [used / total for used, total in totals if total]
        return Signals(
            serving=len(records),
            queued=self.admission.queued(deployment.model) + sum(r.stats.waiting for r in records),
            in_flight=sum(r.in_flight for r in records),
            kv_usage=sum(kv) / len(kv) if kv else 0.0,
            ttft_p90_s=self.ttft.p90(deployment.model, policy.window_s),
        )

    def tick(self) -> list[dict]:
        """Read every autoscaled deployment's signals and scale where they say so; the decisions taken."""
        taken = []
        for deployment in list(self.controller.deployments.values()):
            if not deployment.autoscale:
                continue
            policy = AutoscalePolicy.parse(deployment.autoscale)
            signals = self.signals(deployment, policy)
            self.last_signals[deployment.key] = signals
            decision = self._decide(deployment, policy, signals)
            if decision is not None:
                taken.append(decision)
        return taken

    def _decide(self, deployment, policy: AutoscalePolicy, s: Signals) -> dict | None:
        now = self.clock()
        state = self._states.setdefault(deployment.key, _State())
        per_replica = s.queued / max(1, s.serving)
        hot = []
        if per_replica > policy.queue_per_replica:
            hot.append(f"queue {per_replica:.1f} per worker > {policy.queue_per_replica:g}")
        if s.kv_usage > policy.kv_usage:
            hot.append(f"KV use {s.kv_usage:.0%} > {policy.kv_usage:.0%}")
        idle = s.queued == 0 and s.in_flight == 0
        ttft = s.ttft_p90_s if policy.ttft_p90_s and not idle else None  # a window's old TTFT says nothing when idle
        if ttft is not None and ttft > policy.ttft_p90_s:
            hot.append(f"TTFT p90 {ttft:.2f}s > {policy.ttft_p90_s:g}s")
        cold = (
            per_replica <= policy.queue_per_replica / 2
            and s.kv_usage <= policy.kv_usage / 2
            and not (ttft is not None and ttft > policy.ttft_p90_s / 2)
        )
        state.hot_since = (state.hot_since or now) if hot else None
        state.cold_since = (state.cold_since or now) if cold and not hot else None
        state.idle_since = (state.idle_since or now) if idle else None
        current = deployment.replicas
        status = self.controller.statuses.get(deployment.key)
        loading = status is not None and status.serving < status.planned
        up = hot and now - state.hot_since >= policy.up_after_s and now - state.changed_at >= policy.up_cooldown_s
        down = current > deployment.min_replicas and now - state.changed_at >= policy.down_cooldown_s
        if up and current < deployment.max_replicas and not loading:
            target, reason = current + 1, "; ".join(hot) + f" for {now - state.hot_since:.0f}s"
        elif down and idle and now - state.idle_since >= policy.idle_after_s:
            target, reason = deployment.min_replicas, f"no requests for {now - state.idle_since:.0f}s"
        elif down and state.cold_since is not None and now - state.cold_since >= policy.down_after_s:
            target, reason = current - 1, f"load under half of every threshold for {now - state.cold_since:.0f}s"
        else:
            return None
        state.changed_at, state.hot_since, state.cold_since = now, None, None
        direction = "up" if target > current else "down"
        decision = {
            "at": time.time(),
            "model": deployment.model,
            "role": deployment.role,
            "from": current,
            "to": target,
            "direction": direction,
            "reason": reason,
            "signals": s.to_json(),
        }
        self.decisions.append(decision)
        log.warning("autoscale %s/%s: %d -> %d replicas: %s", deployment.model, deployment.role, current, target,
                    reason)  # fmt: skip
        self.metrics.autoscale_decisions_total.labels(model=deployment.model, direction=direction).inc()
        self.controller.scale(deployment.key, target)
        return decision

    def to_json(self, key: tuple[str, str]) -> dict:
        signals = self.last_signals.get(key)
        return {
            "signals": signals.to_json() if signals is not None else None,
            "decisions": [d for d in self.decisions if (d["model"], d["role"]) == key],
        }
