"""The admin API: list workers, join a local worker, drain or stop one, and the routing counters.

With an admin key configured (``--admin-key``), every ``/admin`` route needs ``Authorization: Bearer KEY`` with
that key (the API keys do not open it); without one, ``/admin`` is guarded like the other routes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request

from fleetserve.errors import InvalidRequestError, NotFoundError
from fleetserve.gateway.registry import WorkerRecord, WorkerState
from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0


def worker_json(w: WorkerRecord, local: dict[str, Any] | None) -> dict:
    total = w.stats.kv_blocks_total or w.info.kv_blocks_total
    return {
        "worker_id": w.worker_id,
        "name": w.name,
        "state": w.state.value,
        "model": w.info.model,
        "role": w.info.role,
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
        "consecutive_failures": w.consecutive_failures,
        "reserved_tokens": w.reserved_tokens,
        "local": local,
    }


def _not_found(worker: str) -> NotFoundError:
    return NotFoundError(f"No worker '{worker}' (give its worker_id or name).", "worker")


def add_admin_routes(app: FastAPI, state: Any) -> None:
    """Mount the /admin routes; ``state`` is the app's GatewayState (registry, dispatcher, control, launcher)."""

    def find(key: str) -> WorkerRecord | None:
        record = state.registry.workers.get(key)
        if record is None:
            matches = [w for w in state.registry.workers.values() if w.name == key]
            live = [w for w in matches if w.state != WorkerState.DEAD]
            record = (live or matches or [None])[0]
        return record

    def local_of(record: WorkerRecord) -> dict | None:
        launched = state.launcher.workers.get(record.name) if state.launcher else None
        return launched.to_json() if launched else None

    @app.get("/admin/workers")
    async def list_workers():
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
        return {"workers": [worker_json(w, local_of(w)) for w in workers] + starting}

    @app.post("/admin/workers", status_code=202)
    async def join_worker(request: Request):
        if state.launcher is None:
            raise InvalidRequestError("this gateway does not launch workers (it has no control address)")
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequestError("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        unknown = sorted(set(body) - {"model", "device", "max_memory_mb", "role"})
        if unknown:
            raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)}", unknown[0])
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("'model' is required (a model name, folder or .gguf file)", "model")
        memory = body.get("max_memory_mb")
        if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0):
            raise InvalidRequestError("'max_memory_mb' must be a positive integer", "max_memory_mb")
        device = body.get("device") or "cpu"
        role = body.get("role") or "replica"
        if not isinstance(device, str) or not isinstance(role, str):
            raise InvalidRequestError("'device' and 'role' must be strings", "device")
        launched = await state.launcher.join(model, device, memory, role)
        return launched.to_json()

    @app.post("/admin/workers/{worker}/drain", status_code=202)
    async def drain_worker(worker: str):
        record = find(worker)
        if record is None:
            raise _not_found(worker)
        if record.state == WorkerState.DEAD:
            raise InvalidRequestError(f"worker '{worker}' is dead: there is nothing to drain", "worker")
        state.control.send(record.worker_id, pb.Command(kind=pb.Command.DRAIN, detail="drain asked by the admin API"))
        record.state = WorkerState.DRAINING  # no new requests from now on, not from the next heartbeat
        return worker_json(record, local_of(record))

    @app.post("/admin/workers/{worker}/stop", status_code=202)
    async def stop_worker(worker: str):
        """Drain, then stop: a remote worker by a STOP command, a local one by SIGTERM, then SIGKILL after the
        grace period."""
        record = find(worker)
        launched = state.launcher.workers.get(worker) if state.launcher else None
        if record is None and launched is None:
            raise _not_found(worker)
        name = record.name if record is not None else worker
        local = state.launcher.workers.get(name) if state.launcher else None
        if record is not None and record.state != WorkerState.DEAD:
            # A remote worker is told to stop (it drains, deregisters and exits); a local one gets SIGTERM below,
            # which does the same, and SIGKILL if it is still there after the grace period.
            kind = pb.Command.DRAIN if local is not None else pb.Command.STOP
            state.control.send(record.worker_id, pb.Command(kind=kind, detail="stop asked by the admin API"))
            record.state = WorkerState.DRAINING
        if local is not None:
            task = asyncio.create_task(state.launcher.stop(name, STOP_GRACE_S))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        return {"name": name, "draining": record is not None, "terminating": local is not None}

    @app.get("/admin/routing")
    async def routing():
        """Each model's policy with its counters (prefix-aware: predicted vs actual cached tokens), queue
        lengths, retries and failovers."""
        dispatcher = state.dispatcher
        return {
            "policies": dispatcher.balancer.describe(),
            "queued": {m: dispatcher.admission.queued(m) for m in state.registry.models()},
            "rejected": dispatcher.admission.rejected,
            "retries": dispatcher.retries,
            "failovers": dispatcher.failovers,
            "workers": [worker_json(w, None) for w in state.registry.workers.values()],
        }
