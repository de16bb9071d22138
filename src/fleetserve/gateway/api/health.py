"""Liveness, readiness and metrics: GET /health (the process answers), GET /ready (every model has a worker that
really generates a token) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from fleetserve.gateway.api.deps import StateDep
from fleetserve.gateway.registry import WorkerRecord
from fleetserve.protocol import fleet_pb2 as pb

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


async def _probe(w: WorkerRecord) -> tuple[WorkerRecord, bool, str]:
    """Ask a worker to generate one token: (worker, whether it did, its detail or the failure)."""
    try:
        reply = await w.stub.Health(pb.HealthRequest(generate=True), timeout=10)
        return w, reply.ok, reply.detail
    except Exception as exc:  # any failure of the probe means not ready; reported in the body
        return w, False, str(exc)[:200]


@router.get("/ready")
async def ready(state: StateDep):
    """Ready when every model has at least one worker that really generates a token."""
    workers = [w for w in state.registry.workers.values() if w.routable]
    results = await asyncio.gather(*(_probe(w) for w in workers))
    models: dict[str, dict] = {m: {"healthy_workers": 0, "workers": []} for m in state.registry.models()}
    for w, ok, detail in results:
        entry = models.setdefault(w.info.model, {"healthy_workers": 0, "workers": []})
        entry["healthy_workers"] += ok
        entry["workers"].append({"name": w.info.name, "ok": ok, "detail": detail})
    is_ready = bool(models) and all(m["healthy_workers"] > 0 for m in models.values())
    return JSONResponse({"ready": is_ready, "models": models}, status_code=200 if is_ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(state: StateDep):
    """Prometheus text format: the gateway's own metrics and per-worker gauges from the heartbeats."""
    metrics = state.dispatcher.metrics
    running: dict[str, int] = {}
    for w in state.registry.workers.values():
        running[w.info.model] = running.get(w.info.model, 0) + w.in_flight
    for model in set(running) | set(state.registry.models()):
        metrics.requests_running.labels(model=model).set(running.get(model, 0))
        metrics.requests_waiting.labels(model=model).set(state.dispatcher.admission.queued(model))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
