"""The OpenAPI description of the HTTP API (``/openapi.json``): request bodies from the same pydantic models that
validate them (``schema.py``), the answers of each route, and the one error shape (``ErrorResponse``).

Routes read their bodies themselves (so that every error is an OpenAI-style 400); ``json_body`` declares the body
each one takes, and ``install`` puts the request models into the document's components, with the few fields
whose accepted forms a validator widens (message content, prompt, stop) described as they are accepted.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from fleetserve.gateway.api import schema
from fleetserve.gateway.api.embedding_schema import MAX_INPUTS, EmbeddingRequest

_REF = "#/components/schemas/{model}"
MAX_TOKEN_ID = 2**32 - 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's shape."""

    error: ErrorDetail


class JobQueued(BaseModel):
    request_id: str
    status: str = Field(description="queued")


class JobStatus(BaseModel):
    request_id: str
    status: str = Field(description="queued, running, completed or failed")
    created: int
    model: str
    result: dict[str, Any] | None = Field(default=None, description="the chat.completion, once completed")
    error: ErrorDetail | None = None


class InferRequest(BaseModel):
    """The body of POST /coordinator/infer."""

    prompt: str = Field(min_length=1)
    model: str = Field(min_length=1, max_length=schema.MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)


class JoinRequest(BaseModel):
    """The body of POST /admin/workers."""

    model_config = {"extra": "forbid"}
    model: str = Field(min_length=1)
    device: str | None = Field(default=None, description="cpu or cuda[:N]")
    max_memory_mb: int | None = Field(default=None, gt=0, description="memory cap in MiB (a stage: weights plus KV)")
    role: str | None = Field(
        default=None,
        description="replica (default: the whole model, whole requests), prefill (computes prompts and hands their KV "
        "to a decode worker), decode (goes on from a prefill worker's KV) or stage (a pipeline stage node)",
    )


COMPONENT_MODELS: tuple[type[BaseModel], ...] = (
    schema.ChatCompletionRequest,
    schema.CompletionRequest,
    EmbeddingRequest,
    InferRequest,
    JoinRequest,
    JobQueued,
    JobStatus,
)

_ERRORS = {
    400: "Invalid request: malformed JSON, a bad parameter, a Host or header refused.",
    401: "Missing or wrong API key.",
    403: "Refused: the admin API without an admin key, or a cross-site browser post.",
    404: "Unknown model or id.",
    413: "The body is over --max-body-mb.",
    415: "The body is not application/json.",
    502: "A worker failed, and so did every retry.",
    503: "No worker or no room for the model right now (see Retry-After).",
}
_GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 502, 503)
_PLAIN_ERRORS = (400, 401, 403, 404)


def _schema(name: str | type[BaseModel] | None) -> dict[str, Any]:
    if name is None:
        return {"type": "object"}
    return {"$ref": _REF.format(model=name if isinstance(name, str) else name.__name__)}


def json_body(model: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is the request model named ``model``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _schema(model)}}}}


def text_body() -> dict[str, Any]:
    """``openapi_extra`` for the route whose body is the prompt as plain text."""
    content = {"text/plain": {"schema": {"type": "string", "minLength": 1}}}
    return {"requestBody": {"required": True, "content": content}}


def answers(
    success: dict[int, tuple[str, str | type[BaseModel] | None]],
    *,
    generation: bool = False,
    errors: bool = True,
    media: str = "application/json",
) -> dict[int | str, dict[str, Any]]:
    """``responses`` for a route: its successful answers (status: description and schema) and the error
    statuses it can give, each with ErrorResponse."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, (description, body) in success.items():
        content = {media: {"schema": _schema(body) if media == "application/json" else {"type": "string"}}}
        out[status] = {"description": description, "content": content}
    if errors:
        for status in _GENERATION_ERRORS if generation else _PLAIN_ERRORS:
            out[status] = {"description": _ERRORS[status], "model": ErrorResponse}
    return out


def stream_answers(description: str, media: str) -> dict[int | str, dict[str, Any]]:
    """``responses`` for a generation route that answers a JSON body, or a stream of ``media``."""
    out = answers({200: (description, None)}, generation=True)
    out[200]["content"][media] = {"schema": {"type": "string"}}
    return out


def _widen(schemas: dict[str, Any]) -> None:
    """Describe the fields whose validators accept more forms than their types say."""
    text_part = {
        "type": "object",
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "required": ["type", "text"],
    }
    schemas["ChatMessage"]["properties"]["content"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]
    }
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}}
    schemas["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string"},
            ids,
            {"type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": [{"type": "string"}, ids]}},
        ]
    }
    schemas["EmbeddingRequest"]["properties"]["input"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": {"type": "string", "minLength": 1}},
            ids,
            {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": ids},
        ]
    }
    schemas["EmbeddingRequest"]["properties"]["encoding_format"] = {
        "anyOf": [{"enum": ["float", "base64"]}, {"type": "null"}]
    }
    stop = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": schema.MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
            {"type": "null"},
        ]
    }
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["stop"] = stop


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the request models in its components (built once, then kept)."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in COMPONENT_MODELS:
        found = model.model_json_schema(ref_template=_REF, mode="validation")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    _widen(schemas)
    app.openapi_schema = document
    return document


def install(app: FastAPI) -> None:
    """Serve ``openapi_document`` at /openapi.json."""
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]


__all__ = ["ErrorResponse", "answers", "install", "json_body", "openapi_document", "stream_answers", "text_body"]
