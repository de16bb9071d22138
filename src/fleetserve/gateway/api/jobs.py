"""Polling mode and request traces: POST /v1/requests starts a chat in the background and answers its id at once,
GET /v1/requests/{id} gives its status and result, GET /v1/requests/{id}/trace the timeline of a recent request."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from fleetserve.contract import SamplingParams
from fleetserve.errors import FleetServeError, NotFoundError
from fleetserve.gateway.api import responses, schema
from fleetserve.gateway.api.deps import Opening, StateDep, error_payload, json_body, open_generation

POLL_KEEP = 1000
"""Finished polling-mode requests kept for GET /v1/requests/{id}."""

router = APIRouter()


@router.post("/v1/requests", status_code=202)
async def submit(request: Request, state: StateDep):
    """Polling mode: returns {request_id} at once; GET /v1/requests/{id} gives status and the result."""
    body = await json_body(request)
    body = {**body, "stream": False} if isinstance(body, dict) else body
    opening = await open_generation(request, state, schema.ChatCompletionRequest, body, responses.new_chat_id())
    params = opening.sampling()
    rid = opening.request_id
    job = {"request_id": rid, "status": "queued", "created": int(time.time()), "model": opening.req.model}
    state.jobs[rid] = job
    while len(state.jobs) > POLL_KEEP:
        state.jobs.pop(next(iter(state.jobs)))
    state.spawn(_run(opening, params, job))
    return {"request_id": rid, "status": "queued"}


async def _run(opening: Opening[schema.ChatCompletionRequest], params: SamplingParams, job: dict[str, Any]) -> None:
    """Generate the job's answer, noting its progress, result or error in ``job``."""
    try:
        started = await opening.start(params)
        job["status"] = "running"
        text, _, finish, usage = await started.collect()
        job["result"] = responses.chat_completion(opening.req.model, opening.request_id, text, finish, usage)
        job["status"] = "completed"
    except FleetServeError as exc:
        job["status"] = "failed"
        job["error"] = error_payload(exc)[1]["error"]


@router.get("/v1/requests/{request_id}")
async def poll(request_id: str, state: StateDep):
    job = state.jobs.get(request_id)
    if job is None:
        raise NotFoundError(f"No request with id '{request_id}'.", "request_id")
    return job


@router.get("/v1/requests/{request_id}/trace")
async def request_trace(request_id: str, state: StateDep):
    trace = state.traces.get(request_id)
    if trace is None:
        raise NotFoundError(f"No trace for request '{request_id}' (only recent requests are kept).", "request_id")
    return trace.to_json()
