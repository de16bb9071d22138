"""The original briefs' routes: POST /v1/chat/{model} (a plain-text prompt in, the answer streamed out as plain
text) and POST /coordinator/infer ({prompt, model, max_tokens} in, SSE events {token, finished} out). Both are
greedy single-message chats."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fleetserve.errors import FleetServeError, InvalidRequestError
from fleetserve.gateway.api import docs, responses, schema
from fleetserve.gateway.api.deps import Opening, StateDep, json_body, open_generation
from fleetserve.gateway.generation import Started
from fleetserve.gateway.state import GatewayState

router = APIRouter()


async def _simple_chat(
    request: Request, state: GatewayState, model: str, content: str, max_tokens: Any
) -> tuple[Opening[schema.ChatCompletionRequest], Started]:
    """Open and start a greedy chat of one user message."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    opening = await open_generation(request, state, schema.ChatCompletionRequest, body, uuid.uuid4().hex)
    return opening, await opening.start(opening.sampling())


@router.post(
    "/v1/chat/{model}",
    openapi_extra=docs.text_body(),
    responses=docs.answers({200: ("The answer as plain text.", None)}, generation=True, media="text/plain"),
)
async def plain_chat(model: str, request: Request, state: StateDep) -> Response:
    """Plain-text prompt in, plain-text answer streamed out."""
    content = (await request.body()).decode("utf-8", errors="replace").strip()
    if not content:
        raise InvalidRequestError("The request body must be the prompt as plain text.", "body")
    opening, started = await _simple_chat(request, state, model, content, None)

    async def body() -> AsyncIterator[bytes]:
        async for ev in started.events():
            if ev.text:
                yield ev.text.encode("utf-8")

    return opening.stream(body(), "text/plain; charset=utf-8")


@router.post(
    "/coordinator/infer",
    openapi_extra=docs.json_body("InferRequest"),
    responses=docs.answers({200: ("SSE events {token, finished}.", None)}, generation=True, media="text/event-stream"),
)
async def coordinator_infer(request: Request, state: StateDep) -> Response:
    """{prompt, model, max_tokens} in; SSE events {token, finished} out."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    missing = [k for k in ("prompt", "model") if not body.get(k)]
    if missing:
        raise InvalidRequestError(f"Missing required field(s): {', '.join(missing)}.", missing[0])
    opening, started = await _simple_chat(
        request, state, str(body["model"]), str(body["prompt"]), body.get("max_tokens")
    )

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for ev in started.events():
                if ev.text or ev.finish_reason:
                    yield responses.sse({"token": ev.text, "finished": bool(ev.finish_reason)})
        except FleetServeError as exc:
            yield responses.sse({"token": "", "finished": True, "error": str(exc)})

    return opening.stream(stream(), "text/event-stream")
