"""Polling mode and request traces: POST /v1/requests starts a chat in the background and answers its id at once,
GET /v1/requests/{id} gives its status and result, GET /v1/requests/{id}/trace the timeline of a recent request.

A job or trace is visible only to the key that made it, and to the admin key: each is kept under its request id in
the namespace of its caller's key (``deps.scoped_id``), so clients choosing the same X-Request-Id never meet. The
trace shown to a caller without the admin key names workers but omits their addresses and failure details.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from fleetserve.contract import SamplingParams
from fleetserve.errors import FleetServeError, NotFoundError
from fleetserve.gateway.api import docs, responses, schema
from fleetserve.gateway.api.deps import (
    Opening,
    StateDep,
    caller,
    error_payload,
    json_body,
    open_generation,
    visible_keys,
)

POLL_KEEP = 1000
"""Finished polling-mode requests kept for GET /v1/requests/{id}."""
PRIVATE_ATTEMPT_FIELDS = ("address", "detail")
"""What a trace's dispatch attempts tell only the admin key: worker addresses and the workers' error details."""

router = APIRouter()


@router.post(
    "/v1/requests",
    status_code=202,
    openapi_extra=docs.json_body("ChatCompletionRequest"),
    responses=docs.answers({202: ("The request was queued.", docs.JobQueued)}, generation=True),
)
async def submit(request: Request, state: StateDep):
    """Polling mode: returns {request_id} at once; GET /v1/requests/{id} gives status and the result."""
    body = await json_body(request)
    body = {**body, "stream": False} if isinstance(body, dict) else body
    opening = await open_generation(request, state, schema.ChatCompletionRequest, body, responses.new_chat_id())
    params = opening.sampling()
    rid = opening.request_id
    job = {"request_id": rid, "status": "queued", "created": int(time.time()), "model": opening.req.model}
    state.jobs.pop(opening.key, None)  # a reused id moves to the end, as the newest
    state.jobs[opening.key] = job
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


@router.get("/v1/requests/{request_id}", responses=docs.answers({200: ("The job's status.", docs.JobStatus)}))
async def poll(request_id: str, request: Request, state: StateDep):
    for key in visible_keys(state, caller(request), request_id):
        job = state.jobs.get(key)
        if job is not None:
            return job
    raise NotFoundError(f"No request with id '{request_id}'.", "request_id")


def trace_view(trace: dict[str, Any], request_id: str, admin: bool) -> dict[str, Any]:
    """A trace's JSON as the caller may see it: under the id the client knows; without worker addresses and
    failure details unless the caller holds the admin key."""
    view = {**trace, "request_id": request_id}
    if admin:
        return view
    view["attempts"] = [{k: v for k, v in a.items() if k not in PRIVATE_ATTEMPT_FIELDS} for a in trace["attempts"]]
    spans = []
    for span in trace["spans"]:
        attributes = span.get("attributes")
        if attributes and "detail" in attributes:
            span = {**span, "attributes": {k: v for k, v in attributes.items() if k != "detail"}}
        spans.append(span)
    view["spans"] = spans
    return view


@router.get("/v1/requests/{request_id}/trace", responses=docs.answers({200: ("The request's timeline.", None)}))
async def request_trace(request_id: str, request: Request, state: StateDep):
    who = caller(request)
    for key in visible_keys(state, who, request_id):
        trace = state.traces.get(key)
        if trace is not None:
            return trace_view(trace.to_json(), request_id, who.admin)
    raise NotFoundError(f"No trace for request '{request_id}' (only recent requests are kept).", "request_id")
