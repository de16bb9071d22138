"""One model's pipeline as the gateway knows it (:class:`PipelineState`), its JSON view, and what a stage node's
registration says of the model (its sizes, and what every stage node of one model must agree on)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fleetserve.gateway.partitioner import ModelSize, PipelinePlan
from fleetserve.gateway.registry import WorkerRecord
from fleetserve.protocol import fleet_pb2 as pb

EVENTS_KEPT = 20
WAITING = "waiting for stage nodes"


@dataclass
class PipelineState:
    """One model's pipeline: its plan and members, what it is doing, and its recent history."""

    model: str
    plan: PipelinePlan | None = None
    """The plan being served; None while there is none."""
    members: tuple[WorkerRecord, ...] = ()
    """The plan's stage records, head first. Records, not ids: a worker that registers again is a new record that
    holds no layers."""
    status: str = WAITING
    """"serving: a [0, 11) -> b [11, 30)", "waiting for capacity: ...", "re-partition failed: ...", ..."""
    repartitions: int = 0
    """Plans applied, the first one included."""
    changed_at: float | None = None
    """When the plan last changed (the controller's clock); None: never."""
    events: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    """Recent changes, (unix time, text), oldest first."""
    report: pb.PipelineReport | None = None
    """The head's latest report of how its steps go."""
    kv_blocks: dict[str, int] = field(default_factory=dict)
    """KV blocks per member (worker id) as its assignment reported them; the head's: the pipeline's."""
    assigned: dict[str, WorkerRecord] = field(default_factory=dict)
    """Records that accepted layers and were not released since."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Held while the model is re-planned: one re-plan at a time."""
    retry: asyncio.TimerHandle | None = field(default=None, repr=False)
    fault_pending: bool = False
    """A stage fault is being looked into: further reports of it wait."""

    @property
    def serving(self) -> bool:
        return self.plan is not None

    @property
    def head_id(self) -> str:
        return self.members[0].worker_id if self.members else ""

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(r.worker_id for r in self.members)

    def event(self, text: str) -> None:
        self.events.append((time.time(), text))

    def to_json(self, depth: int = 0) -> dict[str, Any]:
        """For /v1/models, /admin/pipelines and ``fleetserve nodes list``; ``depth``: the configured micro-batches
        in flight (0: one per stage), shown until the head reports its own."""
        report = self.report or pb.PipelineReport()
        plan = self.plan
        stages = []
        if plan is not None:
            for stage, record in zip(plan.stages, self.members):
                stages.append(
                    {
                        "name": record.name,
                        "worker_id": record.worker_id,
                        "layer_start": stage.layer_start,
                        "layer_end": stage.layer_end,
                        "kv_blocks": self.kv_blocks.get(record.worker_id, stage.kv_blocks),
                    }
                )
        planned_depth = (depth or len(plan.stages)) if plan is not None else 0
        return {
            "model": self.model,
            "status": self.status,
            "serving": self.serving,
            "stages": stages,
            "repartitions": self.repartitions,
            "bubble": report.bubble,
            "depth": report.depth or planned_depth,
            "events": [{"time": t, "text": text} for t, text in self.events],
            "hops": [hop_json(hop) for hop in report.hops],
            "mean_hops": [hop_json(hop) for hop in report.mean_hops],
            "steps": report.steps,
        }


def model_size(info: pb.WorkerInfo) -> ModelSize:
    """What placing the model needs, from a stage node's registration (ValueError for impossible figures)."""
    s = info.stage
    return ModelSize(
        num_layers=info.num_layers,
        layer_bytes=s.layer_bytes,
        embed_bytes=s.embed_bytes,
        lm_head_bytes=s.lm_head_bytes,
        lm_head_read_bytes=s.lm_head_read_bytes,
        kv_bytes_per_token=s.kv_bytes_per_token,
        context_tokens=info.max_model_len,
        block_size=info.block_size,
    )


def stage_identity(info: pb.WorkerInfo) -> dict[str, Any]:
    """What every stage node of one model must agree on: the same weights, cut the same way, KV blocks of the
    same size (the head's block tables address every stage's cache)."""
    return {
        "weights_fingerprint": info.stage.weights_fingerprint,
        "num_layers": info.num_layers,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "block_size": info.block_size,
    }


def hop_json(hop: pb.StageHop) -> dict[str, Any]:
    return {
        "name": hop.name,
        "layer_start": hop.layer_start,
        "layer_end": hop.layer_end,
        "compute_s": hop.compute_s,
        "transfer_s": hop.transfer_s,
        "bytes": hop.bytes,
    }
