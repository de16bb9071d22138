"""Which balancing policy serves each model: one policy instance per model, made on first use from its config."""

from __future__ import annotations

from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.policies import Policy, make_policy


class ModelPolicies:
    """model name -> its Policy. Models without a configured policy use ``default_policy``."""

    def __init__(self, models: ModelRegistry, default_policy: str | None = None):
        self.models = models
        self.default_policy = default_policy
        self._policies: dict[str, Policy] = {}
        if default_policy is not None:
            make_policy(default_policy)  # refuse an unknown name at start-up, not at the first request

    def policy(self, model: str) -> Policy:
        policy = self._policies.get(model)
        if policy is None:
            spec = self.models.get(model)
            if spec is not None and spec.configured:
                name, options = self.models.policy_for(model)
            else:
                name, options = self.default_policy or self.models.policy_for(model)[0], {}
            policy = self._policies[model] = make_policy(name, **options)
        return policy

    def forget(self, worker_id: str) -> None:
        for policy in self._policies.values():
            policy.forget(worker_id)

    def describe(self) -> dict[str, dict]:
        return {model: policy.describe() for model, policy in sorted(self._policies.items())}
