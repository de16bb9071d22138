"""The OpenAI-compatible routes: /v1/chat/completions and /v1/completions (a JSON body, or an SSE stream when asked
for; deterministic requests answered from the response cache when it holds them) and /v1/models."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fleetserve.contract import SamplingParams
from fleetserve.errors import FleetServeError
from fleetserve.gateway.api import docs, responses, schema
from fleetserve.gateway.api.deps import Opening, StateDep, error_payload, json_body, open_generation
from fleetserve.gateway.cache import bypassed
from fleetserve.gateway.generation import Started
from fleetserve.gateway.registry import WorkerState

router = APIRouter()

OpenAIOpening = Opening[schema.ChatCompletionRequest] | Opening[schema.CompletionRequest]


@router.get("/v1/models", responses=docs.answers({200: ("The models served.", None)}))
async def list_models(state: StateDep):
    """Every model the registry knows (configured, or learned from a worker), with its details, how many
    healthy workers serve it and, for a model of pipeline stage nodes, its pipeline."""
    healthy: dict[str, int] = {}
    for w in state.registry.workers.values():  # a stage node counts only as a serving pipeline's head
        healthy[w.info.model] = healthy.get(w.info.model, 0) + (w.state == WorkerState.HEALTHY and w.serving)
    data = []
    pipelines = state.pipelines
    for name in state.models.names():
        spec = state.models.get(name)
        if spec is None or (not spec.configured and name not in healthy):
            continue
        details = {**spec.to_json(), "healthy_workers": healthy.get(name, 0)}
        if pipelines is not None and pipelines.has_stage_nodes(name):
            details["pipeline"] = pipelines.to_json(name)
        data.append({"id": name, "object": "model", "created": 0, "owned_by": "fleetserve", "fleetserve": details})
    return {"object": "list", "data": data}


@router.post(
    "/v1/chat/completions",
    openapi_extra=docs.json_body("ChatCompletionRequest"),
    responses=docs.stream_answers("A chat.completion, or its chunks as server-sent events.", "text/event-stream"),
)
async def chat_completions(request: Request, state: StateDep) -> Response:
    body = await json_body(request)
    opening = await open_generation(request, state, schema.ChatCompletionRequest, body, responses.new_chat_id())
    return await _respond(opening)


@router.post(
    "/v1/completions",
    openapi_extra=docs.json_body("CompletionRequest"),
    responses=docs.stream_answers("A text_completion, or its chunks as server-sent events.", "text/event-stream"),
)
async def completions(request: Request, state: StateDep) -> Response:
    body = await json_body(request)
    opening = await open_generation(request, state, schema.CompletionRequest, body, responses.new_completion_id())
    return await _respond(opening)


async def _answer(opening: OpenAIOpening, params: SamplingParams, chat: bool) -> Started:
    """The answer's events: replayed from the response cache on a hit, else generated (and recorded into the cache
    when the request is deterministic and did not ask to skip it)."""
    state, req, request = opening.state, opening.req, opening.request
    answers = state.answers
    key = None
    if answers is not None and not bypassed(request.headers.get("cache-control")):
        spec = state.models.get(req.model)
        version = spec.version if spec is not None else ""
        stops = schema.stop_strings(req)
        key = answers.key_for(req.model, version, opening.prompt, params, stops, "chat" if chat else "completion")
    affinity = req.user or request.headers.get("x-session-id")
    session = opening.session()
    if session is not None:  # a session's turn runs (its KV is kept for the next turn), never replayed
        return await opening.start(params, affinity, session)
    if answers is None or not key:
        return await opening.start(params, affinity)
    cached = await answers.lookup(key, req.model, opening.trace)
    if cached is not None:
        return Started(None, answers.replay(cached))
    started = await opening.start(params, affinity)
    return Started(None, answers.recording(key, started.events()))


async def _respond(opening: OpenAIOpening) -> Response:
    """Run one OpenAI request: a JSON body, or an SSE stream when it asked for one."""
    req = opening.req
    chat = isinstance(req, schema.ChatCompletionRequest)
    params = opening.sampling()
    want_lp = params.logprobs
    tok = opening.tokenizer
    text_of = (lambda t: tok.decode([t], skip_special_tokens=False)) if want_lp is not None else None
    started = await _answer(opening, params, chat)
    if not req.stream:
        text, lps, finish, usage = await started.collect()
        build = responses.chat_completion if chat else responses.completion
        answer = build(
            req.model, opening.answer_id, text, finish, usage, logprobs=want_lp, token_logprobs=lps, token_text=text_of
        )
        return JSONResponse(answer, headers={"X-Request-Id": opening.request_id})
    stream_cls = responses.ChatStream if chat else responses.CompletionStream
    stream = stream_cls(
        req.model, opening.answer_id, include_usage=req.include_usage, logprobs=want_lp, token_text=text_of
    )
    return opening.stream(_sse(stream, started), "text/event-stream")


async def _sse(stream: responses.ChatStream | responses.CompletionStream, started: Started) -> AsyncIterator[bytes]:
    """The answer as OpenAI's server-sent events, ending with [DONE]."""
    if isinstance(stream, responses.ChatStream):  # a chat stream opens with the assistant role; a completion's not
        yield responses.sse(stream.first_chunk())
    try:
        async for ev in started.events():
            chunk = stream.delta(ev.text, ev.logprobs or None)
            if chunk is not None:
                yield responses.sse(chunk)
            if ev.finish_reason:
                for c in stream.final(ev.finish_reason, ev.usage):
                    yield responses.sse(c)
    except FleetServeError as exc:  # failed mid-stream, retries spent: say so in the stream
        yield responses.sse(error_payload(exc)[1])
    yield responses.SSE_DONE
