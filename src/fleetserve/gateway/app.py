"""The gateway's HTTP app: mounts the routers (OpenAI API, the original briefs' routes, polling jobs and traces,
health and metrics, admin, console) over one GatewayState, with the API-key middleware and the typed-error handler.

The routers live in ``fleetserve.gateway.api``; each gets the state through the ``deps.StateDep`` dependency.
"""

from __future__ import annotations

from fastapi import FastAPI

from fleetserve.errors import FleetServeError
from fleetserve.gateway.api import admin, compat, console, health, jobs, openai
from fleetserve.gateway.api.deps import ApiKeyGuard, fleet_error
from fleetserve.gateway.state import GatewayState

ROUTERS = (health.router, openai.router, jobs.router, compat.router, console.router, admin.router)
"""In matching order: /v1/chat/completions (OpenAI) comes before /v1/chat/{model} (compat)."""


def create_app(state: GatewayState) -> FastAPI:
    """The HTTP app serving ``state``."""
    app = FastAPI(title="fleetserve gateway", docs_url=None, redoc_url=None)
    app.state.fleet = state
    app.middleware("http")(ApiKeyGuard(state.settings))
    app.add_exception_handler(FleetServeError, fleet_error)
    state.dispatcher.metrics.set_worker_source(lambda: list(state.registry.workers.values()))
    for router in ROUTERS:
        app.include_router(router)
    return app


__all__ = ["GatewayState", "create_app"]
