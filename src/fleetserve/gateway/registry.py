"""Workers known to the gateway: registration, heartbeats, and a health state per worker.

healthy -> suspect (a heartbeat is late) -> dead (heartbeat_timeout_s without one); draining workers finish
what they have but get nothing new. Only healthy workers are routable.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class WorkerState(str, enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class WorkerRecord:
    """What the gateway knows of one worker, and its channel."""

    worker_id: str
    info: pb.WorkerInfo
    registered_at: float
    last_heartbeat: float
    state: WorkerState = WorkerState.HEALTHY
    stats: pb.WorkerStats = field(default_factory=pb.WorkerStats)
    recent_first_token_s: float = 0.0
    recent_inter_token_s: float = 0.0
    in_flight: int = 0
    """Requests the gateway has sent to this worker and not yet seen finish."""
    channel: grpc.aio.Channel | None = None
    stub: pb_grpc.WorkerStub | None = None

    @property
    def routable(self) -> bool:
        return self.state == WorkerState.HEALTHY


class WorkerRegistry:
    """The gateway's table of workers, updated by the Control service and a periodic sweep."""

    def __init__(self, heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 5.0):
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, WorkerRecord] = {}
        self._ids = itertools.count(1)

    def register(self, info: pb.WorkerInfo) -> WorkerRecord:
        # A worker that registers again from the same address replaces its old record.
        for old in [w for w in self.workers.values() if w.info.address == info.address]:
            self.remove(old.worker_id)
        now = time.monotonic()
        record = WorkerRecord(f"w{next(self._ids)}-{info.name}", info, now, now)
        record.channel = grpc.aio.insecure_channel(info.address)
        record.stub = pb_grpc.WorkerStub(record.channel)
        self.workers[record.worker_id] = record
        log.info("worker %s registered: %s at %s", record.worker_id, info.model, info.address)
        return record

    def heartbeat(self, report: pb.HeartbeatReport) -> WorkerRecord | None:
        record = self.workers.get(report.worker_id)
        if record is None:
            return None
        record.last_heartbeat = time.monotonic()
        record.stats = report.stats
        record.recent_first_token_s = report.recent_first_token_s
        record.recent_inter_token_s = report.recent_inter_token_s
        if report.draining:
            record.state = WorkerState.DRAINING
        elif record.state in (WorkerState.SUSPECT, WorkerState.DEAD):
            record.state = WorkerState.HEALTHY
        return record

    def remove(self, worker_id: str) -> WorkerRecord | None:
        record = self.workers.pop(worker_id, None)
        if record is not None:
            record.state = WorkerState.DEAD
            log.info("worker %s removed", worker_id)
        return record

    def sweep(self) -> list[WorkerRecord]:
        """Move late workers to suspect and silent ones to dead (removed); returns the removed ones."""
        now = time.monotonic()
        dead = []
        for record in list(self.workers.values()):
            age = now - record.last_heartbeat
            if age > self.heartbeat_timeout_s:
                dead.append(record)
                self.remove(record.worker_id)
            elif age > 2 * self.heartbeat_interval_s and record.state == WorkerState.HEALTHY:
                record.state = WorkerState.SUSPECT
        return dead

    def routable(self, model: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.routable and w.info.model == model]

    def models(self) -> list[str]:
        return sorted({w.info.model for w in self.workers.values()})
