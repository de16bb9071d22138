"""Liveness, readiness and metrics: GET /health (the process answers), GET /ready (every model has a worker that
really generates a token) and GET /metrics (Prometheus text).

/ready does not generate on every call: each worker's one-token probe runs at most every PROBE_INTERVAL_S, and
calls in between (and calls while a probe runs) share its result.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fleetserve.gateway.api import docs
from fleetserve.gateway.api.deps import StateDep
from fleetserve.gateway.api.guard import ANONYMOUS, caller_of
from fleetserve.gateway.registry import WorkerRecord, probe_generation
from fleetserve.gateway.state import GatewayState

PROBE_INTERVAL_S = 5.0
"""A worker's generation probe is repeated at most this often."""
PROBE_TIMEOUT_S = 10.0

router = APIRouter()


@router.get("/health", responses=docs.answers({200: ("The process is up.", None)}, errors=False))
async def health():
    return {"status": "ok"}


def probe(state: GatewayState, w: WorkerRecord) -> asyncio.Task[tuple[bool, str]]:
    """The worker's latest probe when it began under PROBE_INTERVAL_S ago, else a new one."""
    now = time.monotonic()
    cached = state.probes.get(w.worker_id)
    if cached is not None and now - cached[0] < PROBE_INTERVAL_S:
        return cached[1]
    task = asyncio.create_task(probe_generation(w, PROBE_TIMEOUT_S))
    state.probes[w.worker_id] = (now, task)
    return task


@router.get(
    "/ready",
    responses=docs.answers({200: ("Every model has a worker that generates.", None), 503: ("Not ready.", None)}),
)
async def ready(state: StateDep, request: Request):
    """Ready when every model has at least one worker that really generates a token (probed at most every
    PROBE_INTERVAL_S per worker) and every model of pipeline stage nodes a serving pipeline (its entry says what
    the pipeline is doing, e.g. "waiting for capacity: ...").

    Open without an API key (a Kubernetes readiness probe has none); where keys are set, a caller without one
    gets ``{"ready": ...}`` and the status code only, not the models and workers."""
    workers = [w for w in state.registry.workers.values() if w.routable]
    for gone in set(state.probes) - {w.worker_id for w in workers}:
        state.probes.pop(gone)
    tasks = [probe(state, w) for w in workers]
    results = await asyncio.shield(asyncio.gather(*tasks)) if tasks else []
    models: dict[str, dict] = {m: {"healthy_workers": 0, "workers": []} for m in state.registry.models()}
    for w, (ok, detail) in zip(workers, results):
        entry = models.setdefault(w.info.model, {"healthy_workers": 0, "workers": []})
        entry["healthy_workers"] += ok
        entry["workers"].append({"name": w.info.name, "ok": ok, "detail": detail})
    pipelines = state.pipelines
    waiting = set()  # models of stage nodes with no serving pipeline: not ready, whatever else serves them
    for name in pipelines.models() if pipelines is not None else ():
        if pipelines.has_stage_nodes(name):
            entry = models.setdefault(name, {"healthy_workers": 0, "workers": []})
            entry["pipeline"] = pipelines.status(name)
            if not pipelines.serving(name):
                waiting.add(name)
    is_ready = bool(models) and all(m["healthy_workers"] > 0 and n not in waiting for n, m in models.items())
    status = 200 if is_ready else 503
    if state.settings.api_key and caller_of(request.scope) is ANONYMOUS:
        return JSONResponse({"ready": is_ready}, status_code=status)
    return JSONResponse({"ready": is_ready, "models": models}, status_code=status)


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
