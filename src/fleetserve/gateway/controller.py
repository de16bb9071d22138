"""Deployments: per model and role, the workers the fleet should run, and the loop that makes the nodes run them.

A :class:`Deployment` says how many workers of one model in one role (replica, prefill, decode, or stage: a pipeline's nodes) the fleet
wants (``replicas``, kept within ``min_replicas``..``max_replicas``), what each is given (memory, torch threads,
device) and where they may go (node names, node labels). Deployments come from the model config (a model's
``deployment`` key) and change at run time through the admin API.

:class:`DeploymentController` reconciles, every second and whenever a node reports a change:

- **Scale up.** A deployment with fewer planned workers than it wants gets one more on the node that fits best:
  among the nodes its placement allows with a free worker slot, enough free memory and cores, the one with the
  fewest of its workers (replicas spread over machines, so one machine's loss takes few of them), then the most
  free memory, then the most free cores. When no node fits, the deployment says why.
- **Scale down.** One with more gets one fewer: a worker that is not serving yet goes first, then the one with the
  fewest requests in flight. Its node stops it with SIGTERM, so it drains (finishes what it runs) before it exits.
- **Update.** Workers started with other settings than the deployment now gives (device, threads, memory) are
  replaced: those not serving at once, a serving one only while all the others serve (a rolling update).
- **Clean up.** A dead worker record that a managed worker left behind (it crashed and its node started it
  again, under the same name at a new address, or it is no longer planned) is removed from the registry.

Nodes restart crashed workers themselves (with backoff); the controller only decides where workers go.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.autoscaler import AutoscalePolicy
from fleetserve.gateway.nodes import NodeRecord, NodeTable
from fleetserve.gateway.registry import (
    DECODE_ROLE,
    PREFILL_ROLE,
    REPLICA_ROLE,
    STAGE_ROLE,
    WorkerRegistry,
    WorkerState,
)
from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)

DEPLOYABLE_ROLES = (REPLICA_ROLE, PREFILL_ROLE, DECODE_ROLE, STAGE_ROLE)
DEFAULT_MEMORY_MB = 1024
"""A worker's memory when the gateway cannot size the model (it lacks its files) and the deployment gives none."""


@dataclass(frozen=True)
class Sizing:
    """What one worker of a model needs: its whole memory and the KV cache within it (0: the worker's default; a stage
    node's memory is its cap on weights plus KV, and the gateway gives it the layers that fit)."""

    memory_mb: int
    kv_cache_mb: int


@dataclass
class Deployment:
    """The desired shape of one model's workers in one role."""

    model: str
    role: str = REPLICA_ROLE
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0
    """0: no more than ``replicas``."""
    memory_mb: int = 0
    """Each worker's memory (0: what the model needs plus room for a few requests)."""
    threads: int = 1
    device: str = "cpu"
    nodes: list[str] = field(default_factory=list)
    """Node names it may use (empty: any)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Node labels it needs, all of them."""
    autoscale: dict[str, float] = field(default_factory=dict)
    """The autoscaling policy's settings (``gateway.autoscaler``); empty: the replicas stay as set."""

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.role

    def owns(self, launch: pb.WorkerLaunch) -> bool:
        """Whether a planned worker is one of this deployment's."""
        return (launch.model, launch.role or REPLICA_ROLE) == self.key

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_INT_FIELDS = ("replicas", "min_replicas", "max_replicas", "memory_mb", "threads")


def parse_deployment(model: str, data: dict[str, Any], base: Deployment | None = None) -> Deployment:
    """A deployment from a JSON/YAML mapping, over ``base`` (the current one, when changing it); InvalidRequestError
    names the key that is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the deployment of {model} must be a mapping", "deployment")
    values = base.to_json() if base is not None else {"model": model}
    values["model"] = model
    known = set(Deployment.__dataclass_fields__) - {"model"}
    for key, value in data.items():
        if key not in known:
            raise InvalidRequestError(
                f"unknown deployment key {key!r}; valid: {', '.join(sorted(known))}", f"deployment.{key}"
            )
        if key in _INT_FIELDS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidRequestError(f"deployment.{key} must be a whole number >= 0, not {value!r}", key)
        if key in ("role", "device") and not isinstance(value, str):
            raise InvalidRequestError(f"deployment.{key} must be a string", key)
        if key == "nodes" and (not isinstance(value, list) or not all(isinstance(n, str) for n in value)):
            raise InvalidRequestError("deployment.nodes must be a list of node names", key)
        if key == "autoscale":
            value = AutoscalePolicy.parse(value).to_json() if value not in (None, False, {}) else {}
        if key == "labels" and (
            not isinstance(value, dict) or not all(isinstance(v, str) for v in [*value, *value.values()])
        ):
            raise InvalidRequestError("deployment.labels must map label names to strings", key)
        values[key] = value
    deployment = Deployment(**values)
    if deployment.role not in DEPLOYABLE_ROLES:
        raise InvalidRequestError(
            f"a deployment's role is one of {', '.join(DEPLOYABLE_ROLES)}, not {deployment.role!r}", "role"
        )
    if deployment.device != "cpu" and not deployment.device.startswith("cuda"):
        raise InvalidRequestError(f"device must be cpu or cuda[:N], not {deployment.device!r}", "device")
    if deployment.threads < 1:
        raise InvalidRequestError("deployment.threads must be at least 1", "threads")
    if "max_replicas" not in data and (base is None or deployment.max_replicas < deployment.replicas):
        deployment.max_replicas = max(deployment.max_replicas, deployment.replicas)
    if "min_replicas" not in data and base is not None and deployment.min_replicas > deployment.replicas:
        deployment.min_replicas = deployment.replicas
    if deployment.min_replicas > deployment.max_replicas:
        raise InvalidRequestError(
            f"min_replicas {deployment.min_replicas} is above max_replicas {deployment.max_replicas}", "min_replicas"
        )
    if not deployment.min_replicas <= deployment.replicas <= deployment.max_replicas:
        raise InvalidRequestError(
            f"replicas {deployment.replicas} is outside min_replicas..max_replicas "
            f"({deployment.min_replicas}..{deployment.max_replicas})",
            "replicas",
        )
    return deployment


@dataclass
class DeploymentStatus:
    """Desired against actual for one deployment."""

    desired: int = 0
    planned: int = 0
    running: int = 0
    """Planned workers their node reports running."""
    serving: int = 0
    """Planned workers registered and healthy."""
    crash_looping: list[dict] = field(default_factory=list)
    waiting: str = ""
    """Why the deployment has fewer planned workers than it wants, if it has."""


class DeploymentController:
    """Keeps the nodes' plans in line with the deployments (see the module docstring)."""

    def __init__(self, nodes: NodeTable, registry: WorkerRegistry, sizing: Callable[[str, str, int, str], Sizing]):
        self.nodes = nodes
        self.registry = registry
        self.sizing = sizing
        """(model, device, memory_mb or 0, role) -> what one worker needs; InvalidRequestError when it cannot fit."""
        self.deployments: dict[tuple[str, str], Deployment] = {}
        self.statuses: dict[tuple[str, str], DeploymentStatus] = {}
        self.on_change: list[Callable[[Deployment], None]] = []
        """Called after a deployment is set, scaled or removed (e.g. to store it)."""
        self.autoscaler = None
        """The autoscaler whose signals and decisions :meth:`to_json` shows, if there is one."""

    # -- the desired shape ------------------------------------------------------------------------------

    def set(self, model: str, data: dict[str, Any]) -> Deployment:
        """Create or change the deployment of ``model`` in ``data['role']`` (default replica); checks that one
        worker can be sized before taking it."""
        role = data.get("role", REPLICA_ROLE)
        deployment = parse_deployment(model, data, self.deployments.get((model, role)))
        self.sizing(model, deployment.device, deployment.memory_mb, deployment.role)  # refuses a model it cannot size
        self.deployments[deployment.key] = deployment
        log.info("deployment %s/%s: %d replica(s) (%d..%d)", model, deployment.role, deployment.replicas,
                 deployment.min_replicas, deployment.max_replicas)  # fmt: skip
        for hook in self.on_change:
            hook(deployment)
        self.reconcile()
        return deployment

    def scale(self, key: tuple[str, str], replicas: int) -> None:
        """Set a deployment's replicas (within its bounds), as the autoscaler decides."""
        deployment = self.deployments[key]
        deployment.replicas = max(deployment.min_replicas, min(deployment.max_replicas, replicas))
        for hook in self.on_change:
            hook(deployment)
        self.reconcile()

    def remove(self, model: str, role: str = REPLICA_ROLE) -> Deployment | None:
        """Forget a deployment; its workers are stopped (they drain)."""
        deployment = self.deployments.pop((model, role), None)
        if deployment is not None:
            for node, launch in self._placed(deployment):
                self.nodes.unassign(node, launch.name)
            self.statuses.pop(deployment.key, None)
            deployment.replicas = 0
            for hook in self.on_change:
                hook(deployment)
        return deployment

    # -- reconciling ------------------------------------------------------------------------------------

    def _placed(self, deployment: Deployment) -> list[tuple[NodeRecord, pb.WorkerLaunch]]:
        return [(node, launch) for node, launch in self.nodes.placed() if deployment.owns(launch)]

    def reconcile(self) -> list[str]:
        """One pass over every deployment; what it did, in words."""
        actions: list[str] = []
        for deployment in list(self.deployments.values()):
            actions += self._reconcile(deployment)
        self._clean_up()
        return actions

    def _reconcile(self, deployment: Deployment) -> list[str]:
        status = DeploymentStatus(desired=deployment.replicas)
        placed = self._placed(deployment)
        actions = self._replace_outdated(deployment, placed)
        while len(placed) < deployment.replicas:
            node, why = self._best_node(deployment)
            if node is None:
                status.waiting = why
                break
            launch = self._launch(deployment)
            self.nodes.assign(node, launch)
            placed.append((node, launch))
            actions.append(f"placed {launch.name} ({deployment.model}/{deployment.role}) on {node.name}")
        while len(placed) > deployment.replicas:
            node, launch = min(placed, key=self._keep_order)
            self.nodes.unassign(node, launch.name)
            placed.remove((node, launch))
            actions.append(f"stopping {launch.name} ({deployment.model}/{deployment.role}) on {node.name}")
        for node, launch in placed:
            seen = node.workers.get(launch.name)
            status.running += seen is not None and seen.state == "running"
            status.serving += self._serving(launch.name)
            if seen is not None and seen.state == "crash-looping":
                status.crash_looping.append(
                    {
                        "worker": launch.name,
                        "node": node.name,
                        "exit_code": seen.last_exit_code,
                        "last_lines": list(seen.last_lines),
                    }  # fmt: skip
                )
        status.planned = len(placed)
        self.statuses[deployment.key] = status
        for action in actions:
            log.info("deployments: %s", action)
        return actions

    def _replace_outdated(self, deployment: Deployment, placed: list[tuple[NodeRecord, pb.WorkerLaunch]]) -> list[str]:
        """Stop the workers started with other settings than the deployment's now (device, threads, memory): all
        that do not serve at once, and a serving one only while every other planned worker serves (a rolling
        update). The scale-up that follows starts their replacements. ``placed`` loses the stopped ones."""
        wanted = self._launch(deployment)
        outdated = [
            (n, w)
            for n, w in placed
            if (w.device, w.threads, w.memory_mb) != (wanted.device, wanted.threads, wanted.memory_mb)
        ]
        actions = []
        serving = {w.name for _, w in placed if self._serving(w.name)}
        rolling = len(serving) == len(placed)  # a serving one may go only while every one serves, one per pass
        for node, launch in outdated:
            if launch.name in serving:
                if not rolling:
                    continue
                rolling = False
            self.nodes.unassign(node, launch.name)
            placed.remove((node, launch))
            actions.append(f"replacing {launch.name} on {node.name}: the deployment changed")
        return actions

    def _keep_order(self, placed: tuple[NodeRecord, pb.WorkerLaunch]) -> tuple:
        """Sorts the worker to stop first first: one not serving yet, then the fewest requests in flight."""
        name = placed[1].name
        record = self._record(name)
        return self._serving(name), record.in_flight if record is not None else 0, name

    def _serving(self, name: str) -> bool:
        record = self._record(name)
        return record is not None and record.state == WorkerState.HEALTHY

    def _record(self, name: str):
        live = [r for r in self.registry.workers.values() if r.name == name and r.state != WorkerState.DEAD]
        return live[0] if live else None

    def _best_node(self, deployment: Deployment) -> tuple[NodeRecord | None, str]:
        sizing = self.sizing(deployment.model, deployment.device, deployment.memory_mb, deployment.role)
        allowed = [n for n in self.nodes.live() if n.matches(deployment.labels, deployment.nodes)]
        if not allowed:
            return None, "no node matches its placement" if self.nodes.live() else "no node is connected"
        fits = []
        for node in allowed:
            memory, cores, slots = node.free()
            if slots > 0 and memory >= sizing.memory_mb and cores >= deployment.threads:
                mine = sum(1 for w in node.plan.values() if deployment.owns(w))
                fits.append((-mine, memory, cores, node.name, node))
        if not fits:
            return None, (
                f"no node has a free worker slot, {sizing.memory_mb} MiB and {deployment.threads} core(s) free"
            )
        return max(fits, key=lambda f: f[:4])[4], ""

    def _launch(self, deployment: Deployment) -> pb.WorkerLaunch:
        sizing = self.sizing(deployment.model, deployment.device, deployment.memory_mb, deployment.role)
        taken = {launch.name for _, launch in self.nodes.placed()}
        prefix = deployment.model if deployment.role == REPLICA_ROLE else f"{deployment.model}-{deployment.role}"
        name = f"{prefix}-{secrets.token_hex(3)}"
        while name in taken:
            name = f"{prefix}-{secrets.token_hex(3)}"
        return pb.WorkerLaunch(
            name=name,
            model=deployment.model,
            role=deployment.role,
            device=deployment.device,
            threads=deployment.threads,
            memory_mb=sizing.memory_mb,
            kv_cache_mb=sizing.kv_cache_mb,
        )

    def _clean_up(self) -> None:
        """Remove the dead records managed workers left behind."""
        planned = {launch.name for _, launch in self.nodes.placed()}
        managed = planned | {name for node in self.nodes.nodes.values() for name in node.workers}
        live_names = {r.name for r in self.registry.workers.values() if r.state != WorkerState.DEAD}
        for record in list(self.registry.workers.values()):
            if record.state != WorkerState.DEAD or record.name not in managed:
                continue
            if record.name in live_names or record.name not in planned:
                log.info("deployments: removing the dead record of %s (%s)", record.name, record.worker_id)
                self.registry.remove(record.worker_id)

    # -- reporting --------------------------------------------------------------------------------------

    def to_json(self) -> list[dict]:
        out = []
        for key, deployment in sorted(self.deployments.items()):
            status = self.statuses.get(key) or DeploymentStatus(desired=deployment.replicas)
            entry = {**deployment.to_json(), "status": asdict(status)}
            if deployment.autoscale and self.autoscaler is not None:
                entry["autoscaling"] = self.autoscaler.to_json(key)
            out.append(entry)
        return out
