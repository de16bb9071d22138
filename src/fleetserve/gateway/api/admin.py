"""The admin API: list workers, join a local worker, drain or stop one, the pipelines and the routing counters.

With an admin key configured (``--admin-key``), every ``/admin`` route needs ``Authorization: Bearer KEY`` with
that key (the API keys do not open it). Without one, ``/admin`` is refused (403) when API keys are set, and open
when none are, except launching workers, which always needs an admin key (the rules live in ``guard.HttpGuard``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleetserve.errors import InvalidRequestError, NotFoundError
from fleetserve.gateway.api import docs
from fleetserve.gateway.api.deps import StateDep, json_body
from fleetserve.gateway.launcher import ROLES
from fleetserve.gateway.registry import WorkerRecord, WorkerState
from fleetserve.gateway.state import GatewayState
from fleetserve.protocol import fleet_pb2 as pb

STOP_GRACE_S = 30.0
JOIN_FIELDS = {"model", "device", "max_memory_mb", "role"}

router = APIRouter(
    prefix="/admin", responses={403: {"description": "No admin key is configured.", "model": docs.ErrorResponse}}
)
_OK = docs.answers({200: ("The answer.", None)})
_ACCEPTED = docs.answers({202: ("Accepted.", None)})


def worker_json(w: WorkerRecord, local: dict[str, Any] | None) -> dict:
    total = w.stats.kv_blocks_total or w.info.kv_blocks_total
    return {
        "worker_id": w.worker_id,
        "name": w.name,
        "state": w.state.value,
        "model": w.info.model,
        "role": w.info.role,
        "kind": w.info.kind or "generate",
        "layer_start": w.info.layer_start,
        "layer_end": w.info.layer_end,
        "serving": w.serving,
        "address": w.info.address,
        "device": w.info.device,
        "memory_cap_bytes": w.info.memory_cap_bytes,
        "running": w.stats.running,
        "waiting": w.stats.waiting,
        "in_flight": w.in_flight,
        "kv_blocks_used": w.stats.kv_blocks_used,
        "kv_blocks_total": total,
        "kv_usage": w.stats.kv_blocks_used / total if total else 0.0,
        "recent_ttft_s": w.recent_first_token_s,
        "recent_itl_s": w.recent_inter_token_s,
        "cached_blocks_reported": len(w.block_hashes),
        "sessions_held": len(w.sessions),
        "heartbeats_via": w.heartbeats_via,
        "consecutive_failures": w.consecutive_failures,
        "reserved_tokens": w.reserved_tokens,
        "decode_graphs_ready": w.stats.decode_graphs_ready,
        "decode_graphs_pending": w.stats.decode_graphs_pending,
        "local": local,
    }


def _not_found(worker: str) -> NotFoundError:
    return NotFoundError(f"No worker '{worker}' (give its worker_id or name).", "worker")


def _find(state: GatewayState, key: str) -> WorkerRecord | None:
    """The worker with this id, else a live one with this name, else any with this name."""
    record = state.registry.workers.get(key)
    if record is None:
        matches = [w for w in state.registry.workers.values() if w.name == key]
        live = [w for w in matches if w.state != WorkerState.DEAD]
        record = (live or matches or [None])[0]
    return record


def _local_json(state: GatewayState, name: str) -> dict | None:
    """What the launcher knows of a worker it started here, or None."""
    launched = state.launcher.workers.get(name) if state.launcher else None
    return launched.to_json() if launched else None


def _command(state: GatewayState, record: WorkerRecord, kind: int, detail: str) -> None:
    """Send a command to a worker and stop routing to it at once, not from its next heartbeat."""
    if state.control is None:
        raise RuntimeError("this gateway has no control service to send commands through")
    state.control.send(record.worker_id, pb.Command(kind=kind, detail=detail))
    record.state = WorkerState.DRAINING


@router.get("/workers", responses=_OK)
async def list_workers(state: StateDep):
    workers = sorted(state.registry.workers.values(), key=lambda w: w.name)
    registered = {w.name for w in workers}
    starting = [  # launched here, not registered yet
        {
            "name": lw.name,
            "state": "starting" if lw.popen.poll() is None else "exited",
            "model": lw.model,
            "device": lw.device,
            "role": lw.role,
            "local": lw.to_json(),
        }  # fmt: skip
        for lw in (state.launcher.workers.values() if state.launcher else ())
        if lw.name not in registered
    ]
    return {"workers": [worker_json(w, _local_json(state, w.name)) for w in workers] + starting}


def _join_request(body: Any) -> tuple[str, str, int | None, str]:
    """A join request's (model, device, max_memory_mb, role), checked."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    unknown = sorted(set(body) - JOIN_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required (a model name, folder or .gguf file)", "model")
    memory = body.get("max_memory_mb")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0):
        raise InvalidRequestError("'max_memory_mb' must be a positive integer", "max_memory_mb")
    device = body.get("device") or "cpu"
    if not isinstance(device, str):
        raise InvalidRequestError("'device' must be a string: cpu or cuda[:N]", "device")
    role = body.get("role") or "replica"
    if role not in ROLES:  # also a non-string
        raise InvalidRequestError(f"'role' must be one of: {', '.join(ROLES)} (not {role!r})", "role")
    return model, device, memory, role


@router.post("/workers", status_code=202, openapi_extra=docs.json_body("JoinRequest"), responses=_ACCEPTED)
async def join_worker(request: Request, state: StateDep):
    if state.launcher is None:
        raise InvalidRequestError("this gateway does not launch workers (it has no control address)")
    body = await json_body(request)
    launched = await state.launcher.join(*_join_request(body))
    return launched.to_json()


@router.post("/workers/{worker}/drain", status_code=202, responses=_ACCEPTED)
async def drain_worker(worker: str, state: StateDep):
    record = _find(state, worker)
    if record is None:
        raise _not_found(worker)
    if record.state == WorkerState.DEAD:
        raise InvalidRequestError(f"worker '{worker}' is dead: there is nothing to drain", "worker")
    _command(state, record, pb.Command.DRAIN, "drain asked by the admin API")
    return worker_json(record, _local_json(state, record.name))


@router.post("/workers/{worker}/stop", status_code=202, responses=_ACCEPTED)
async def stop_worker(worker: str, state: StateDep):
    """Drain, then stop: a remote worker by a STOP command, a local one by SIGTERM, then SIGKILL after the
    grace period."""
    record = _find(state, worker)
    launched = state.launcher.workers.get(worker) if state.launcher else None
    if record is None and launched is None:
        raise _not_found(worker)
    name = record.name if record is not None else worker
    local = state.launcher.workers.get(name) if state.launcher else None
    if record is not None and record.state != WorkerState.DEAD:
        # A remote worker is told to stop (it drains, deregisters and exits); a local one gets SIGTERM below,
        # which does the same, and SIGKILL if it is still there after the grace period.
        kind = pb.Command.DRAIN if local is not None else pb.Command.STOP
        _command(state, record, kind, "stop asked by the admin API")
    if local is not None and state.launcher is not None:
        state.spawn(state.launcher.stop(name, STOP_GRACE_S))
    return {"name": name, "draining": record is not None, "terminating": local is not None}


@router.get("/pipelines", responses=_OK)
async def list_pipelines(state: StateDep):
    """Every model of pipeline stage nodes: its status, stages and layer ranges, re-partitions, bubble, depth,
    recent events and the latest step's hops."""
    pipelines = state.pipelines
    if pipelines is None:
        return {"pipelines": []}
    return {"pipelines": [pipelines.to_json(model) for model in pipelines.models()]}


@router.get("/routing", responses=_OK)
async def routing(state: StateDep):
    """Each model's policy with its counters (prefix-aware: predicted vs actual cached tokens), queue
    lengths, the time routing decisions take, retries and failovers."""
    dispatcher = state.dispatcher
    return {
        "policies": dispatcher.policies.describe(),
        "queued": {m: dispatcher.admission.queued(m) for m in state.registry.models()},
        "rejected": dispatcher.admission.rejected,
        "decisions": dispatcher.admission.decision_times.summary(),
        "retries": dispatcher.retries,
        "failovers": dispatcher.failovers,
        "workers": [worker_json(w, None) for w in state.registry.workers.values()],
    }
