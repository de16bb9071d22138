"""What every router depends on: the typed GatewayState, the API-key rules, typed errors as HTTP answers, and the
opening every generation route shares (parse the body, assign the request id, begin the trace, find the tokenizer,
tokenize the prompt).

Typed errors become HTTP statuses with OpenAI-style bodies here and only here.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response

from fleetserve.contract import SamplingParams
from fleetserve.errors import InvalidRequestError, NoWorkerError, UnknownModelError, UpstreamError
from fleetserve.gateway.api import responses, schema
from fleetserve.gateway.api.schema import RequestT
from fleetserve.gateway.generation import Started, generate_text
from fleetserve.gateway.state import GatewayState
from fleetserve.gateway.streaming import SlowClientStreamingResponse
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.telemetry.tracing import Trace, request_id_var
from fleetserve.text.tokenizer import Tokenizer

RETRY_AFTER_S = "1"
PUBLIC_PATHS = {"/health", "/", "/favicon.ico"}
"""Routes open without an API key: liveness and the console's static page (its API calls carry the key)."""
PUBLIC_PREFIX = "/console/"
"""The console's static files are open too."""


# -- typed state ------------------------------------------------------------------------------------------------


def get_state(request: Request) -> GatewayState:
    """The app's GatewayState (``create_app`` keeps it in ``app.state.fleet``)."""
    state = request.app.state.fleet
    if not isinstance(state, GatewayState):
        raise TypeError(f"app.state.fleet is a {type(state).__name__}, not a GatewayState")
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
"""A route parameter typed this way receives the GatewayState."""


# -- errors -------------------------------------------------------------------------------------------------------


def error_payload(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI-style error body of an exception (a worker's failure is a 502)."""
    if isinstance(exc, UpstreamError):
        return 502, responses.error_body(str(exc), "server_error", None, "worker_failed")
    return responses.error_for(exc)


def error_response(exc: BaseException) -> JSONResponse:
    """The error as a JSON answer; a 503 says when to retry."""
    status, body = error_payload(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def fleet_error(request: Request, exc: Exception) -> Response:
    """The exception handler of every FleetServeError a route raises."""
    return error_response(exc)


# -- API keys -----------------------------------------------------------------------------------------------------


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse(
        responses.error_body(message, "invalid_request_error", None, "invalid_api_key"), status_code=401
    )


def _bearer(request: Request) -> str | None:
    """The request's bearer key, or None when it sent none."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else None


class ApiKeyGuard:
    """The HTTP middleware that checks keys. With an admin key set, every ``/admin`` route needs exactly that key
    (the API keys do not open it); otherwise, with API keys set, every route but PUBLIC_PATHS and the console's
    files needs one of them. It also notes when each request arrived (its trace starts there)."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.keys = set(settings.api_key)

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.arrived = time.monotonic()
        refusal = self.refusal(request)
        if refusal is not None:
            return _unauthorized(refusal)
        return await call_next(request)

    def refusal(self, request: Request) -> str | None:
        """Why the request may not pass (the 401's message), or None when it may."""
        path = request.url.path
        admin_key = self.settings.admin_key
        if admin_key and path.startswith("/admin"):
            key = _bearer(request)
            if key is None or not hmac.compare_digest(key, admin_key):
                return "The admin API needs the admin key: send 'Authorization: Bearer ADMIN_KEY'."
            return None
        if not self.keys or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            return None
        return None if _bearer(request) in self.keys else "Missing or wrong API key: send 'Authorization: Bearer KEY'."


# -- the opening of a generation request --------------------------------------------------------------------------


async def json_body(request: Request) -> Any:
    """The request's body decoded as JSON; anything else is a 400."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None


def tokenizer_for(state: GatewayState, model: str) -> Tokenizer:
    """The model's tokenizer; a model with no worker yet is a 503, an unknown one a 404."""
    tok = state.tokenizers.get(model)
    if tok is None:
        if state.models.get(model) is not None:
            raise NoWorkerError(f"The model '{model}' has no worker yet; retry shortly.")
        known = ", ".join(state.models.names()) or "none yet"
        raise UnknownModelError(f"The model '{model}' does not exist or has no worker (served: {known}).")
    return tok


def _begin(state: GatewayState, request: Request, model: str, body_id: str) -> tuple[str, Trace]:
    """The request's id (its X-Request-Id when it sent a usable one, else ``body_id``) and its trace, which starts
    at the request's arrival with the receive span (reading and parsing the body)."""
    given = request.headers.get("x-request-id", "")
    rid = given if 0 < len(given) <= 128 and given.isprintable() else body_id
    request_id_var.set(rid)
    trace = state.traces.start(rid, model, arrived=getattr(request.state, "arrived", None))
    trace.add_span("receive", 0.0)
    return rid, trace


async def _tokenize(
    state: GatewayState, req: schema.ChatCompletionRequest | schema.CompletionRequest, tok: Tokenizer, trace: Trace
) -> list[int]:
    """The prompt's token ids: the chat template applied to the messages, or the completion prompt tokenized
    (given as token ids, it is used as is); the preprocess span covers the work."""
    if isinstance(req, schema.CompletionRequest) and isinstance(req.prompt, list):
        return list(req.prompt)
    pool = state.preprocess
    start = trace.elapsed()
    if isinstance(req, schema.ChatCompletionRequest):
        messages = req.message_dicts()
        if pool is not None:
            prompt = await pool.encode_chat(state.tokenizers.folders[req.model], messages)
        else:
            prompt = tok.encode_chat(messages)
    elif pool is not None:
        prompt = await pool.encode(state.tokenizers.folders[req.model], req.prompt)
    else:
        prompt = tok.encode(req.prompt)
    trace.add_span("preprocess", start, prompt_tokens=len(prompt))
    return prompt


@dataclass
class Opening(Generic[RequestT]):
    """A generation request after its opening: the parsed request, its ids, trace, tokenizer and prompt."""

    state: GatewayState
    request: Request
    req: RequestT
    answer_id: str
    """The id an answer body carries (``chatcmpl-...``, ``cmpl-...``)."""
    request_id: str
    """The X-Request-Id the client sent when usable, else ``answer_id``: the trace's and the logs' id."""
    trace: Trace
    tokenizer: Tokenizer
    prompt: list[int]

    def sampling(self) -> SamplingParams:
        """The request's SamplingParams, with its model's default temperature, top_p and max_tokens where it gave
        none."""
        spec = self.state.models.get(self.req.model)
        default_max = self.state.settings.default_max_tokens
        if spec is not None and spec.max_tokens is not None:
            default_max = spec.max_tokens
        return schema.to_sampling_params(
            self.req,
            default_max,
            len(self.prompt),
            self.state.tokenizers.max_model_len[self.req.model],
            default_temperature=spec.temperature if spec is not None else None,
            default_top_p=spec.top_p if spec is not None else None,
        )

    async def start(self, params: SamplingParams, affinity_key: str | None = None) -> Started:
        """Begin generating with the request's stop strings and priority; errors before the first event surface
        here, as HTTP errors, not as a broken stream."""
        trace = self.trace if self.state.traces.enabled else None  # telemetry off: no dispatch or generation spans
        events = generate_text(
            self.state.dispatcher,
            self.tokenizer,
            self.req.model,
            self.request_id,
            self.prompt,
            params,
            schema.stop_strings(self.req),
            self.req.priority,
            affinity_key,
            trace,
        )
        return await Started.of(events)

    def stream(self, body: AsyncIterator[bytes], media_type: str) -> SlowClientStreamingResponse:
        """A streamed answer with the request's id, cut off when the client stops reading."""
        return SlowClientStreamingResponse(
            body,
            media_type=media_type,
            headers={"X-Request-Id": self.request_id},
            slow_client_timeout_s=self.state.settings.slow_client_timeout,
            request_id=self.request_id,
        )


async def open_generation(
    request: Request, state: GatewayState, model_cls: type[RequestT], body: Any, body_id: str
) -> Opening[RequestT]:
    """Parse ``body`` as ``model_cls``, assign the request id (``body_id`` unless the client sent a usable
    X-Request-Id), begin the trace, find the model's tokenizer and tokenize the prompt."""
    req = schema.parse_request(model_cls, body)
    rid, trace = _begin(state, request, req.model, body_id)
    tok = tokenizer_for(state, req.model)
    prompt = await _tokenize(state, req, tok, trace)
    return Opening(state, request, req, body_id, rid, trace, tok, prompt)


__all__ = [
    "PUBLIC_PATHS",
    "RETRY_AFTER_S",
    "ApiKeyGuard",
    "Opening",
    "StateDep",
    "error_payload",
    "error_response",
    "fleet_error",
    "get_state",
    "json_body",
    "open_generation",
    "tokenizer_for",
]
