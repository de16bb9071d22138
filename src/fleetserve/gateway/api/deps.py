"""What every router depends on: the typed GatewayState, the caller (which the guard in ``guard.py`` found) and the
request ids it may see, typed errors as HTTP answers, and the opening every generation route shares (parse and
check the body, assign the request id, begin the trace, find the tokenizer, tokenize the prompt).

Typed errors become HTTP statuses with OpenAI-style bodies here and only here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Generic

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response

from fleetserve.contract import SamplingParams
from fleetserve.errors import InvalidRequestError, NoWorkerError, UnknownModelError, UpstreamError
from fleetserve.gateway.api import responses, schema
from fleetserve.gateway.api.guard import Caller, caller_of
from fleetserve.gateway.api.schema import RequestT
from fleetserve.gateway.generation import Started, generate_text
from fleetserve.gateway.models import GENERATE_KIND, ROUTES_OF_KIND
from fleetserve.gateway.sessions import check_session_id
from fleetserve.gateway.state import GatewayState
from fleetserve.gateway.streaming import SlowClientStreamingResponse
from fleetserve.telemetry.tracing import Trace, request_id_var
from fleetserve.text.tokenizer import Tokenizer

RETRY_AFTER_S = "1"
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON body may have (the API's own bodies need 4)."""
CHARS_PER_TOKEN_BOUND = 16
"""No token covers more characters than this: a prompt longer than this times the context cannot fit."""
WORKER_FAILED = "A worker failed while serving the request, and so did every retry; try again later."


# -- typed state ------------------------------------------------------------------------------------------------


async def get_state(request: Request) -> GatewayState:
    """The app's GatewayState (``create_app`` keeps it in ``app.state.fleet``). A coroutine, though it awaits
    nothing: FastAPI runs a plain function dependency in a thread pool, a thread hop on every request."""
    state = request.app.state.fleet
    if not isinstance(state, GatewayState):
        raise TypeError(f"app.state.fleet is a {type(state).__name__}, not a GatewayState")
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]
"""A route parameter typed this way receives the GatewayState."""


# -- errors -------------------------------------------------------------------------------------------------------


def error_payload(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI-style error body of an exception (a worker's failure is a 502)."""
    if isinstance(exc, UpstreamError):  # the worker's address and the gRPC detail stay in logs and admin traces
        return 502, responses.error_body(WORKER_FAILED, "server_error", None, "worker_failed")
    return responses.error_for(exc)


def error_response(exc: BaseException) -> JSONResponse:
    """The error as a JSON answer; a 503 says when to retry."""
    status, body = error_payload(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def fleet_error(request: Request, exc: Exception) -> Response:
    """The exception handler of every FleetServeError a route raises."""
    return error_response(exc)


# -- who asks, and what they may see -------------------------------------------------------------------------------


def caller(request: Request) -> Caller:
    """Who sent the request (the guard recorded it)."""
    return caller_of(request.scope)


def scoped_id(tag: str, request_id: str) -> str:
    """The key a request's job and trace are kept under: its id in the namespace of the key that sent it, so that
    two clients' ids never meet."""
    return f"{tag}:{request_id}"


def visible_keys(state: GatewayState, who: Caller, request_id: str) -> list[str]:
    """The keys under which ``who`` may find ``request_id``: its own namespace; the admin key also any other
    (and a full ``tag:id`` key)."""
    keys = [scoped_id(who.tag, request_id)]
    if who.admin:
        keys += [scoped_id(tag, request_id) for tag in sorted(state.owner_tags)] + [request_id]
    return keys


# -- the opening of a generation request --------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_json_shape(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings (keys too) with lone surrogates, which no tokenizer,
    protobuf or JSON answer can carry; iterative, so no input can exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            items: list[Any] = [item]
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequestError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
            items = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in items if isinstance(v, (list, dict)))
            items = [v for v in items if isinstance(v, str)]
        else:
            continue
        for text in items:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError("The request body has a string with a lone surrogate (not UTF-8).") from None


async def json_body(request: Request) -> Any:
    """The request's body decoded as JSON; anything else (NaN and Infinity included) is a 400, and so is a body
    too deep or with lone surrogates (``check_json_shape``)."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a too long integer, NaN
        raise InvalidRequestError(f"The request body is not valid JSON: {str(exc)[:200]}") from None
    check_json_shape(body)
    return body


def tokenizer_for(state: GatewayState, model: str) -> Tokenizer:
    """The model's tokenizer; a model with no worker yet is a 503, an unknown one a 404."""
    tok = state.tokenizers.get(model)
    if tok is None:
        if state.models.get(model) is not None:
            raise NoWorkerError(f"The model '{model}' has no worker yet; retry shortly.")
        known = ", ".join(state.models.names()) or "none yet"
        raise UnknownModelError(f"The model '{model}' does not exist or has no worker (served: {known}).")
    return tok


def check_kind(state: GatewayState, model: str, kind: str) -> None:
    """Refuse a request on a route its model does not serve (a chat for an embedding model, or the reverse), with a
    400 that names the model's route."""
    spec = state.models.get(model)
    served = (spec.kind if spec is not None else "") or GENERATE_KIND
    if served != kind:
        raise InvalidRequestError(
            f"The model '{model}' is a model of kind '{served}': it is served on {ROUTES_OF_KIND[served]}, not here.",
            "model",
        )


def begin_trace(state: GatewayState, model: str, rid: str, tag: str, arrived: float | None) -> tuple[str, Trace]:
    """The key a request's trace and job are kept under (its id in its caller's namespace ``tag``), and its trace,
    which starts at the request's arrival with the receive span (reading and parsing the body)."""
    state.owner_tags.add(tag)
    key = scoped_id(tag, rid)
    request_id_var.set(rid)
    trace = state.traces.start(key, model, arrived=arrived)
    trace.add_span("receive", 0.0)
    return key, trace


def _prompt_chars(req: schema.ChatCompletionRequest | schema.CompletionRequest) -> int:
    """The characters of the prompt's text (messages' contents and names), or the number of token ids."""
    if isinstance(req, schema.ChatCompletionRequest):
        return sum(len(m.content) + len(m.role) + len(m.name or "") for m in req.messages)
    return len(req.prompt)


def check_prompt_size(
    req: schema.ChatCompletionRequest | schema.CompletionRequest, tok: Tokenizer, max_model_len: int
) -> None:
    """Refuse, before tokenizing, a prompt that cannot fit: more token ids than the context, or more characters
    than CHARS_PER_TOKEN_BOUND per token of it; and token ids the model's tokenizer does not have."""
    what = "messages" if isinstance(req, schema.ChatCompletionRequest) else "prompt"
    if isinstance(req, schema.CompletionRequest) and isinstance(req.prompt, list):
        if len(req.prompt) >= max_model_len:
            raise schema.ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{len(req.prompt)} tokens. Please reduce the length of the prompt.",
                "prompt",
            )
        vocab = len(tok)
        bad = next((t for t in req.prompt if t >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"Token id {bad} is not in the model's vocabulary (0..{vocab - 1}).", "prompt")
        return
    chars = _prompt_chars(req)
    if chars > CHARS_PER_TOKEN_BOUND * max_model_len:
        raise schema.ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {what} has {chars} "
            f"characters, more than any {max_model_len} tokens can hold. Please reduce the length of the {what}.",
            what,
        )


async def _tokenize(
    state: GatewayState, req: schema.ChatCompletionRequest | schema.CompletionRequest, trace: Trace
) -> list[int]:
    """The prompt's token ids: the chat template applied to the messages, or the completion prompt tokenized
    (given as token ids, it is used as is); the preprocess span covers the work."""
    if isinstance(req, schema.CompletionRequest) and isinstance(req.prompt, list):
        return list(req.prompt)
    start = trace.elapsed()
    if isinstance(req, schema.ChatCompletionRequest):
        prompt = await state.preprocess.encode_chat(req.model, req.message_dicts())
    else:
        prompt = await state.preprocess.encode(req.model, req.prompt)
    trace.add_span("preprocess", start, prompt_tokens=len(prompt))
    return prompt


@dataclass
class Opening(Generic[RequestT]):
    """A generation request after its opening: the parsed request, its ids, trace, tokenizer and prompt."""

    state: GatewayState
    request: Request | None
    """The HTTP request; None for a generation opened again from a stored body (:func:`reopen_generation`)."""
    req: RequestT
    answer_id: str
    """The id an answer body carries (``chatcmpl-...``, ``cmpl-...``)."""
    request_id: str
    """The X-Request-Id the client sent, else ``answer_id``: the logs' id and the one the client polls by."""
    key: str
    """Where its trace and job are kept: ``request_id`` in its caller's namespace."""
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

    def session(self) -> str | None:
        """The conversation session the request names (its ``session_id`` field, else its X-Session-Id header), as
        the key workers pin it under: the id in its caller's namespace. None when it names none."""
        if self.request is None:
            return None
        given = getattr(self.req, "session_id", None) or self.request.headers.get("x-session-id")
        if given is None:
            return None
        return scoped_id(caller(self.request).tag, check_session_id(given))

    async def start(
        self, params: SamplingParams, affinity_key: str | None = None, session: str | None = None
    ) -> Started:
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
            session,
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
    """Parse ``body`` as ``model_cls``, find the model's tokenizer, refuse a prompt that cannot fit before
    tokenizing it (``check_prompt_size``), assign the request id (``body_id`` unless the client sent an
    X-Request-Id; the guard has refused values that are not short printable ASCII), begin the trace and tokenize
    the prompt."""
    rid = request.headers.get("x-request-id", "") or body_id
    arrived = getattr(request.state, "arrived", None)
    return await _open(state, request, model_cls, body, body_id, rid, caller(request).tag, arrived)


async def reopen_generation(
    state: GatewayState, model_cls: type[RequestT], body: Any, request_id: str, tag: str
) -> Opening[RequestT]:
    """A generation opened again from its stored body, outside any HTTP request (a polling job whose gateway died,
    taken over): kept under ``request_id`` in the namespace ``tag`` it was made in."""
    return await _open(state, None, model_cls, body, request_id, request_id, tag, None)


async def _open(
    state: GatewayState,
    request: Request | None,
    model_cls: type[RequestT],
    body: Any,
    answer_id: str,
    rid: str,
    tag: str,
    arrived: float | None,
) -> Opening[RequestT]:
    req = schema.parse_request(model_cls, body)
    tok = tokenizer_for(state, req.model)
    check_kind(state, req.model, GENERATE_KIND)
    check_prompt_size(req, tok, state.tokenizers.max_model_len[req.model])
    key, trace = begin_trace(state, req.model, rid, tag, arrived)
    prompt = await _tokenize(state, req, trace)
    return Opening(state, request, req, answer_id, rid, key, trace, tok, prompt)


__all__ = [
    "RETRY_AFTER_S",
    "Opening",
    "StateDep",
    "caller",
    "check_json_shape",
    "check_kind",
    "begin_trace",
    "check_prompt_size",
    "error_payload",
    "error_response",
    "fleet_error",
    "get_state",
    "json_body",
    "open_generation",
    "reopen_generation",
    "scoped_id",
    "tokenizer_for",
    "visible_keys",
]
