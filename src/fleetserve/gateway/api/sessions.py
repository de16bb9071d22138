"""Conversation sessions: DELETE /v1/sessions/{id} lets a session's KV go at once; GET /admin/sessions lists them.

A session is the caller's own: its id is kept in the namespace of the key that named it (as request ids are), so
one client can neither end nor see another's. The admin listing shows every session with its worker, the tokens
and blocks that worker reports holding for it, its idle time and the time left before its TTL frees it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from fastapi import APIRouter, Request

from fleetserve.errors import NotFoundError
from fleetserve.gateway.api import docs
from fleetserve.gateway.api.deps import StateDep, caller, scoped_id
from fleetserve.gateway.sessions import check_session_id
from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)

router = APIRouter()


@router.delete("/v1/sessions/{session_id}", responses=docs.answers({200: ("The session was released.", None)}))
async def delete_session(session_id: str, request: Request, state: StateDep):
    """Release a conversation session's KV on its worker now (404 when no worker holds it)."""
    key = scoped_id(caller(request).tag, check_session_id(session_id))
    table = state.dispatcher.sessions
    entry = table.forget(key)
    workers = {w.worker_id: w for w in table.holders(key)}
    if entry is not None and entry.worker_id in state.registry.workers:
        workers[entry.worker_id] = state.registry.workers[entry.worker_id]
    released = await asyncio.gather(*(_release(w, key) for w in workers.values()))
    if entry is None and not any(released):
        raise NotFoundError(f"No session with id '{session_id}'.", "session_id")
    return {"id": session_id, "object": "session", "deleted": True}


async def _release(worker, key: str) -> bool:
    if worker.stub is None:
        return False
    try:
        reply = await worker.stub.ReleaseSession(pb.SessionRequest(session_id=key), timeout=5)
    except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
        log.info("could not release a session on %s: %s", worker.name, exc)
        return False
    worker.sessions.pop(key, None)
    return reply.found


@router.get("/admin/sessions", responses=docs.answers({200: ("The sessions, newest first.", None)}))
async def list_sessions(state: StateDep):
    """Every conversation session the gateway routes, with its worker and what that worker holds for it."""
    table = state.dispatcher.sessions
    return {"sessions": table.to_json(), "moved": table.moved}
