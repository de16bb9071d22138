"""The admin API of deployments and node agents: what each model should run, where it runs, and the machines.

``GET /admin/deployments`` lists each deployment with its desired and actual counts (planned, running on their
nodes, serving), crash-looping workers with their last lines, and why it waits when no node fits.
``PUT /admin/deployments/{model}`` creates or changes one (the body's fields over the current ones; ``role``
picks which of the model's deployments), ``DELETE /admin/deployments/{model}?role=...`` removes one (its workers
drain and stop). ``GET /admin/nodes`` lists the node agents: what each offers, what is free, and each worker's
state as its node reports it. Changing deployments needs the admin key (``guard``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from fleetserve.errors import InvalidRequestError, NotFoundError
from fleetserve.gateway.api import docs
from fleetserve.gateway.api.deps import StateDep, json_body
from fleetserve.gateway.controller import DeploymentController
from fleetserve.gateway.registry import REPLICA_ROLE
from fleetserve.gateway.state import GatewayState

router = APIRouter(
    prefix="/admin", responses={403: {"description": "No admin key is configured.", "model": docs.ErrorResponse}}
)
_OK = docs.answers({200: ("The answer.", None)})


def _controller(state: GatewayState) -> DeploymentController:
    if state.deployments is None:
        raise InvalidRequestError("this gateway runs no deployments")
    return state.deployments


def _one(controller: DeploymentController, model: str, role: str) -> dict:
    return next(d for d in controller.to_json() if d["model"] == model and d["role"] == role)


@router.get("/deployments", responses=_OK)
async def list_deployments(state: StateDep):
    controller = state.deployments
    return {"deployments": controller.to_json() if controller is not None else []}


@router.put("/deployments/{model}", responses=_OK)
async def set_deployment(model: str, request: Request, state: StateDep):
    controller = _controller(state)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object of deployment fields.")
    deployment = controller.set(model, body)
    return _one(controller, model, deployment.role)


@router.delete("/deployments/{model}", responses=_OK)
async def remove_deployment(model: str, state: StateDep, role: str = REPLICA_ROLE):
    removed = _controller(state).remove(model, role)
    if removed is None:
        raise NotFoundError(f"No deployment of '{model}' in role '{role}'.", "model")
    return {"model": model, "role": role, "removed": True}


@router.get("/nodes", responses=_OK)
async def list_nodes(state: StateDep):
    controller = state.deployments
    return {"nodes": controller.nodes.to_json() if controller is not None else []}
