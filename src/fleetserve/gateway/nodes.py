"""The machines that run workers for the gateway: node agents, what each offers, and the plan each is given.

A node agent (``fleetserve node``) holds one NodeSession stream open with the gateway. Its reports carry the
machine (cores, memory, devices, worker slots, labels) and the state of each worker it runs; the gateway answers
with the node's *plan*, the whole set of workers the node should run, each time the plan changes. The
deployment controller writes plans; this module keeps them, with the nodes' last reports.

A node is known by its name. A node whose stream ends is *disconnected*; its workers go on (they register with
the gateway on their own) and it gets its plan back when it reconnects. A node disconnected for longer than the
grace is *lost*: its plan is dropped, so the controller places those workers elsewhere. When a node connects,
the workers it already runs and the gateway's plan does not name (after a restart of the gateway, or of the
node's plan) are adopted into its plan, so that neither side's restart stops a serving worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)

CONNECTED, DISCONNECTED, LOST = "connected", "disconnected", "lost"
LIVE_STATES = ("starting", "running", "backoff")
"""Worker states of a node's report that stand for a worker that is, or will soon be, serving."""


@dataclass
class NodeRecord:
    """One node agent: its offer, its plan, and what it last reported."""

    node_id: str
    info: pb.NodeInfo
    connected_at: float
    last_seen: float
    state: str = CONNECTED
    plan: dict[str, pb.WorkerLaunch] = field(default_factory=dict)
    """The workers it should run, by name."""
    plan_version: int = 0
    applied_version: int = 0
    """The latest plan version the node said it applied."""
    workers: dict[str, pb.NodeWorker] = field(default_factory=dict)
    """Its workers as its last report listed them, by name."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the plan changes: the node's stream sends it."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def memory_mb(self) -> int:
        return self.info.memory_bytes // 2**20

    def used(self) -> tuple[int, int]:
        """(MiB, cores) its plan sets aside."""
        return sum(w.memory_mb for w in self.plan.values()), sum(w.threads for w in self.plan.values())

    def free(self) -> tuple[int, int, int]:
        """(MiB, cores, worker slots) its plan leaves."""
        memory, cores = self.used()
        return self.memory_mb - memory, self.info.cpus - cores, self.info.max_workers - len(self.plan)

    def matches(self, labels: dict[str, str], names: list[str]) -> bool:
        """Whether a placement of these labels (all must match) and node names (any; none: every node) allows it."""
        if names and self.name not in names:
            return False
        return all(self.info.labels.get(k) == v for k, v in labels.items())

    def to_json(self) -> dict:
        memory, cores, slots = self.free()
        return {
            "id": self.node_id,
            "name": self.name,
            "state": self.state,
            "host": self.info.host,
            "cpus": self.info.cpus,
            "memory_mb": self.memory_mb,
            "gpus": self.info.gpus,
            "max_workers": self.info.max_workers,
            "labels": dict(self.info.labels),
            "free": {"memory_mb": memory, "cpus": cores, "workers": slots},
            "plan_version": self.plan_version,
            "applied_version": self.applied_version,
            "workers": [_worker_json(self.plan.get(name), self.workers.get(name)) for name in self._names()],
        }

    def _names(self) -> list[str]:
        return sorted(set(self.plan) | set(self.workers))


def _worker_json(launch: pb.WorkerLaunch | None, seen: pb.NodeWorker | None) -> dict:
    out: dict = {"planned": launch is not None}
    if launch is not None:
        out.update(
            name=launch.name,
            model=launch.model,
            role=launch.role,
            device=launch.device,
            threads=launch.threads,
            memory_mb=launch.memory_mb,
        )
    if seen is not None:
        out.update(
            name=seen.name,
            model=seen.model,
            role=seen.role,
            state=seen.state,
            pid=seen.pid,
            restarts=seen.restarts,
            crashes=seen.crashes,
            last_exit_code=seen.last_exit_code,
            last_lines=list(seen.last_lines),
            next_start_in_s=round(seen.next_start_in_s, 3),
            uptime_s=round(seen.uptime_s, 3),
        )
    else:
        out["state"] = "pending"
    return out


class NodeTable:
    """The gateway's nodes by id, and their plans."""

    def __init__(self, lost_after_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.lost_after_s = lost_after_s
        self.clock = clock
        self.nodes: dict[str, NodeRecord] = {}
        self.on_change: list[Callable[[], None]] = []
        """Called when a node connects, reports a change in its workers, or is lost: the controller reconciles."""

    def by_name(self, name: str) -> NodeRecord | None:
        return next((n for n in self.nodes.values() if n.name == name), None)

    def live(self) -> list[NodeRecord]:
        """Nodes that are not lost, by name."""
        return sorted((n for n in self.nodes.values() if n.state != LOST), key=lambda n: n.name)

    def connect(self, report: pb.NodeReport) -> NodeRecord:
        """A node's first report on a new stream: its record (the same one, by name, when it comes back), with the
        workers it runs and the plan lacks adopted into its plan."""
        now = self.clock()
        info = report.info
        node = self.by_name(info.name)
        if node is None:
            node = NodeRecord(f"n-{uuid.uuid4().hex[:12]}", info, now, now)
            self.nodes[node.node_id] = node
            log.info("node %s connected: %d core(s), %d MiB, %d slot(s)", info.name, info.cpus,
                     info.memory_bytes // 2**20, info.max_workers)  # fmt: skip
        else:
            log.info("node %s connected again (it was %s)", info.name, node.state)
            node.info, node.connected_at = info, now
        node.state, node.last_seen = CONNECTED, now
        adopted = False
        for worker in report.workers:
            if worker.name not in node.plan and worker.state in LIVE_STATES:
                node.plan[worker.name] = _launch_of(worker)
                adopted = True
                log.info("node %s: adopted its running worker %s (%s)", info.name, worker.name, worker.model)
        if adopted or node.plan_version == 0:
            self._bump(node)
        else:
            node.changed.set()  # a fresh stream sends the current plan
        self.report(node, report)
        return node

    def report(self, node: NodeRecord, report: pb.NodeReport) -> None:
        """Apply a report: the machine's offer and its workers' states."""
        node.last_seen = self.clock()
        node.info = report.info
        node.applied_version = report.plan_version
        before = {name: w.state for name, w in node.workers.items()}
        node.workers = {w.name: w for w in report.workers}
        if before != {name: w.state for name, w in node.workers.items()}:
            self._notify()

    def disconnect(self, node: NodeRecord) -> None:
        if node.state == CONNECTED:
            node.state, node.last_seen = DISCONNECTED, self.clock()
            log.warning("node %s disconnected; its workers keep their plan for %gs", node.name, self.lost_after_s)

    def sweep(self) -> list[NodeRecord]:
        """Mark nodes disconnected for longer than the grace as lost (their plans dropped); those newly lost."""
        now, lost = self.clock(), []
        for node in self.nodes.values():
            if node.state == DISCONNECTED and now - node.last_seen > self.lost_after_s:
                node.state = LOST
                dropped = sorted(node.plan)
                node.plan.clear()
                node.workers.clear()
                self._bump(node)
                lost.append(node)
                log.warning("node %s lost: its worker(s) %s will be placed elsewhere", node.name, ", ".join(dropped))
        if lost:
            self._notify()
        return lost

    def assign(self, node: NodeRecord, launch: pb.WorkerLaunch) -> None:
        node.plan[launch.name] = launch
        self._bump(node)

    def unassign(self, node: NodeRecord, name: str) -> pb.WorkerLaunch | None:
        launch = node.plan.pop(name, None)
        if launch is not None:
            self._bump(node)
        return launch

    def plan_message(self, node: NodeRecord, report_interval_s: float) -> pb.NodePlan:
        node.changed.clear()
        return pb.NodePlan(
            version=node.plan_version,
            workers=list(node.plan.values()),
            node_id=node.node_id,
            report_interval_s=report_interval_s,
        )

    def placed(self) -> list[tuple[NodeRecord, pb.WorkerLaunch]]:
        """Every planned worker of every node that is not lost."""
        return [(node, launch) for node in self.live() for launch in node.plan.values()]

    def _bump(self, node: NodeRecord) -> None:
        node.plan_version += 1
        node.changed.set()

    def _notify(self) -> None:
        for hook in self.on_change:
            hook()

    def to_json(self) -> list[dict]:
        return [n.to_json() for n in sorted(self.nodes.values(), key=lambda n: n.name)]


def _launch_of(worker: pb.NodeWorker) -> pb.WorkerLaunch:
    """The plan entry of a worker a node runs and the plan lacks: what the node says it was started with."""
    if worker.HasField("launch"):
        launch = pb.WorkerLaunch()
        launch.CopyFrom(worker.launch)
        return launch
    return pb.WorkerLaunch(name=worker.name, model=worker.model, role=worker.role)
