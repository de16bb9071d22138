"""The balancing policies by name (which worker among the candidates gets a request), and ``make_policy``."""

from __future__ import annotations

import inspect

from fleetserve.gateway.policies.base import Policy, RouteRequest
from fleetserve.gateway.policies.consistent_hash import ConsistentHashPolicy
from fleetserve.gateway.policies.kv_aware import KVAwarePolicy
from fleetserve.gateway.policies.least_connections import LeastConnectionsPolicy
from fleetserve.gateway.policies.least_latency import LeastLatencyPolicy
from fleetserve.gateway.policies.power_of_two import PowerOfTwoPolicy
from fleetserve.gateway.policies.prefill_queue import PrefillQueuePolicy
from fleetserve.gateway.policies.prefix_aware import PrefixAwarePolicy
from fleetserve.gateway.policies.random_choice import RandomPolicy
from fleetserve.gateway.policies.round_robin import RoundRobinPolicy
from fleetserve.gateway.policies.weighted import WeightedPolicy

DEFAULT_POLICY = "prefix-aware"

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobinPolicy,
        RandomPolicy,
        LeastConnectionsPolicy,
        LeastLatencyPolicy,
        WeightedPolicy,
        KVAwarePolicy,
        PrefixAwarePolicy,
        PowerOfTwoPolicy,
        ConsistentHashPolicy,
        PrefillQueuePolicy,
    )
}
"""Policy name -> policy class."""


def policy_options(name: str) -> list[str]:
    """The option names the policy's constructor takes."""
    parameters = inspect.signature(POLICIES[name].__init__).parameters
    return [p for p in parameters if p not in ("self", "clock")]  # the clock is for tests, not configuration


def make_policy(name: str, **options) -> Policy:
    """A new policy by name, with options for its constructor (``-`` in an option name reads as ``_``)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing policy {name!r}; known policies: {', '.join(POLICIES)}")
    options = {key.replace("-", "_"): value for key, value in options.items()}
    known = policy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) if known else "none"
        raise ValueError(f"policy {name!r} has no option(s) {', '.join(unknown)}; its options: {takes}")
    return cls(**options)


__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "ConsistentHashPolicy",
    "KVAwarePolicy",
    "LeastConnectionsPolicy",
    "LeastLatencyPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "PrefillQueuePolicy",
    "PrefixAwarePolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "WeightedPolicy",
    "make_policy",
    "policy_options",
]
