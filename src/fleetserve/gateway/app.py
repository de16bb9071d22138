"""The gateway's HTTP app: mounts the routers (OpenAI API, the original briefs' routes, polling jobs and traces,
health and metrics, admin, console) over one GatewayState, behind the edge's guard (``api/guard.py``: hosts, keys,
headers, content types, body sizes), with every error answered in OpenAI's shape and the OpenAPI document built
from the request models (``api/docs.py``).

The routers live in ``fleetserve.gateway.api``; each gets the state through the ``deps.StateDep`` dependency.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from fleetserve.errors import FleetServeError
from fleetserve.gateway.api import (
    admin,
    compat,
    console,
    deployments,
    docs,
    embeddings,
    health,
    jobs,
    openai,
    responses,
    sessions,
)
from fleetserve.gateway.api.deps import fleet_error
from fleetserve.gateway.api.guard import HttpGuard
from fleetserve.gateway.state import GatewayState

log = logging.getLogger(__name__)

ROUTERS = (
    health.router,
    openai.router,
    embeddings.router,
    jobs.router,
    sessions.router,
    compat.router,
    console.router,
    admin.router,
    deployments.router,
)
"""In matching order: /v1/chat/completions (OpenAI) comes before /v1/chat/{model} (compat)."""


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = getattr(exc, "headers", None)
    return JSONResponse(responses.error_body(str(detail), kind, None, code), status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """A path or query parameter FastAPI itself refused: a 400, not its 422."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
    message = f"Invalid value for '{param}': {errors[0]['msg']}." if errors else "Invalid request."
    return JSONResponse(responses.error_body(message, "invalid_request_error", param or None), status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as a 500 in OpenAI's shape without details."""
    log.exception("unhandled error on %s %s", request.method, request.scope.get("path"))
    body = responses.error_body("The server had an error while processing your request.", "server_error")
    return JSONResponse(body, status_code=500)


def create_app(state: GatewayState) -> FastAPI:
    """The HTTP app serving ``state``."""
    app = FastAPI(title="fleetserve gateway", version="1", docs_url=None, redoc_url=None)
    app.state.fleet = state
    app.add_middleware(HttpGuard, settings=state.settings)
    app.add_exception_handler(FleetServeError, fleet_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    state.dispatcher.metrics.set_worker_source(lambda: list(state.registry.workers.values()))
    if state.deployments is not None:
        state.dispatcher.metrics.set_node_source(lambda: state.deployments)
    for router in ROUTERS:
        app.include_router(router)
    docs.install(app)
    return app


__all__ = ["GatewayState", "create_app"]
