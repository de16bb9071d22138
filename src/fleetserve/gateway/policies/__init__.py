"""Balancing policies, by name: which worker among the candidates gets a request.

``consistent-hash`` lives in :mod:`fleetserve.gateway.router`, which imports this package's ``base``; to keep
either module importable first, ``POLICIES`` and ``ConsistentHashPolicy`` are resolved on first use.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest
from fleetserve.gateway.policies.kv_aware import KVAwarePolicy
from fleetserve.gateway.policies.least_connections import LeastConnectionsPolicy
from fleetserve.gateway.policies.least_latency import LeastLatencyPolicy
from fleetserve.gateway.policies.power_of_two import PowerOfTwoPolicy
from fleetserve.gateway.policies.prefix_aware import PrefixAwarePolicy
from fleetserve.gateway.policies.random_choice import RandomPolicy
from fleetserve.gateway.policies.round_robin import RoundRobinPolicy
from fleetserve.gateway.policies.weighted import WeightedPolicy

if TYPE_CHECKING:
    from fleetserve.gateway.router import ConsistentHashPolicy

DEFAULT_POLICY = "prefix-aware"

_policies: dict[str, type[Policy]] | None = None


def _registry() -> dict[str, type[Policy]]:
    """Name -> policy class (built on first use, see the module docstring)."""
    global _policies
    if _policies is None:
        from fleetserve.gateway.router import ConsistentHashPolicy

        _policies = {
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
            )
        }
    return _policies


def __getattr__(name: str):
    if name == "POLICIES":
        return _registry()
    if name == "ConsistentHashPolicy":
        return _registry()["consistent-hash"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def policy_options(name: str) -> list[str]:
    """The option names the policy's constructor takes."""
    parameters = inspect.signature(_registry()[name].__init__).parameters
    return [p for p in parameters if p not in ("self", "clock")]  # the clock is for tests, not configuration


def make_policy(name: str, **options) -> Policy:
    """A new policy by name, with options for its constructor (``-`` in an option name reads as ``_``)."""
    policies = _registry()
    cls = policies.get(name)
    if cls is None:
        raise ValueError(f"unknown balancing policy {name!r}; known policies: {', '.join(policies)}")
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
    "PrefixAwarePolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "WeightedPolicy",
    "make_policy",
    "policy_options",
]
