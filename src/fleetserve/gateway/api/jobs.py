"""Polling mode and request traces: POST /v1/requests starts a chat in the background and answers its id at once,
GET /v1/requests/{id} gives its status and result, GET /v1/requests/{id}/trace the timeline of a recent request.

Jobs live in the gateway's job store (``--job-store``): its memory, or Redis shared by several gateways, where a
gateway asked about an unfinished job whose gateway died takes it over (``job_store``). A job or trace is visible
only to the key that made it, and to the admin key: each is kept under its request id in
the namespace of its caller's key (``deps.scoped_id``), so clients choosing the same X-Request-Id never meet. The
trace shown to a caller without the admin key names workers but omits their addresses and failure details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    reopen_generation,
    visible_keys,
)
from fleetserve.gateway.job_store import FINISHED, JobStoreError
from fleetserve.gateway.state import GatewayState

PRIVATE_ATTEMPT_FIELDS = ("address", "detail")
"""What a trace's dispatch attempts tell only the admin key: worker addresses and the workers' error details."""

log = logging.getLogger(__name__)
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
    job: dict[str, Any] = {
        "request_id": rid,
        "status": "queued",
        "created": int(time.time()),
        "model": opening.req.model,
    }
    if state.jobs.shared:  # what another gateway needs to run it again, should this one die first
        job["request"] = {"body": body, "tag": caller(request).tag}
    await state.jobs.save(opening.key, job)
    await state.jobs.claim(opening.key)
    state.spawn(_run(state, opening, params, job))
    return {"request_id": rid, "status": "queued"}


async def _run(
    state: GatewayState, opening: Opening[schema.ChatCompletionRequest], params: SamplingParams, job: dict[str, Any]
) -> None:
    """Generate the job's answer, noting its progress, result or error in the job store (holding the job's lease
    meanwhile, in a shared store)."""
    store, key = state.jobs, opening.key
    keeper = asyncio.ensure_future(_keep_lease(store, key)) if store.shared else None
    try:
        started = await opening.start(params)
        job["status"] = "running"
        await _save(store, key, job)
        text, _, finish, usage = await started.collect()
        job["result"] = responses.chat_completion(opening.req.model, opening.request_id, text, finish, usage)
        job["status"] = "completed"
    except FleetServeError as exc:
        _failed(job, exc)
    finally:
        if keeper is not None:
            keeper.cancel()
    await _finish(store, key, job)


def _failed(job: dict[str, Any], exc: FleetServeError) -> None:
    job["status"] = "failed"
    job["error"] = error_payload(exc)[1]["error"]


async def _finish(store, key: str, job: dict[str, Any]) -> None:
    """Store the job's final state and let its lease go."""
    await _save(store, key, job)
    with contextlib.suppress(JobStoreError):
        await store.release(key)


async def _save(store, key: str, job: dict[str, Any]) -> None:
    try:
        await store.save(key, job)
    except JobStoreError:
        log.warning("job %s: its %s status could not be stored", key, job["status"])


async def _keep_lease(store, key: str) -> None:
    """Renew this gateway's hold on a running job until cancelled (or until another gateway holds it)."""
    while True:
        await asyncio.sleep(store.lease_s / 3)
        try:
            if not await store.renew(key):
                log.warning("job %s: another gateway holds it now", key)
                return
        except JobStoreError:
            pass  # the store is away: the lease may lapse and another gateway run the job too


async def _take_over(state: GatewayState, key: str, job: dict[str, Any]) -> None:
    """Run again, here, an unfinished job whose gateway is gone (this gateway holds its lease now)."""
    spec = job.get("request") or {}
    job["taken_over"] = int(job.get("taken_over", 0)) + 1
    log.info("job %s: its gateway let its lease lapse; running it here", key)
    try:
        opening = await reopen_generation(
            state, schema.ChatCompletionRequest, spec.get("body"), job["request_id"], str(spec.get("tag", ""))
        )
        params = opening.sampling()
    except FleetServeError as exc:
        _failed(job, exc)
        await _finish(state.jobs, key, job)
        return
    job["status"] = "queued"
    await _save(state.jobs, key, job)
    state.spawn(_run(state, opening, params, job))


@router.get("/v1/requests/{request_id}", responses=docs.answers({200: ("The job's status.", docs.JobStatus)}))
async def poll(request_id: str, request: Request, state: StateDep):
    for key in visible_keys(state, caller(request), request_id):
        job = await state.jobs.load(key)
        if job is None:
            continue
        if state.jobs.shared and job["status"] not in FINISHED and await state.jobs.claim(key):
            await _take_over(state, key, job)
        return {k: v for k, v in job.items() if k != "request"}
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
