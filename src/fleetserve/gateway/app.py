"""The gateway's HTTP app: OpenAI-compatible routes, the original briefs' routes, health and readiness.

Typed errors become HTTP statuses with OpenAI-style bodies here and only here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from fleetserve.errors import (
    FleetServeError,
    InvalidRequestError,
    NotFoundError,
    NoWorkerError,
    UnknownModelError,
    UpstreamError,
)
from fleetserve.gateway.admin import add_admin_routes
from fleetserve.gateway.answer_cache import AnswerCache, bypassed
from fleetserve.gateway.api import responses, schema
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.generation import TextEvent, Usage, generate_text
from fleetserve.gateway.launcher import Launcher
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.preprocess import PreprocessPool
from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.gateway.streaming import SlowClientStreamingResponse
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.telemetry.tracing import Trace, TraceStore, request_id_var
from fleetserve.text.tokenizer import Tokenizer

RETRY_AFTER_S = "1"
CONSOLE_DIR = Path(__file__).resolve().parent / "console"
PUBLIC_PATHS = {"/health", "/", "/favicon.ico"}
"""Routes open without an API key: liveness and the console's static page (its API calls carry the key)."""
POLL_KEEP = 1000
"""Finished polling-mode requests kept for GET /v1/requests/{id}."""


@dataclass
class GatewayState:
    """Everything the routes share."""

    registry: WorkerRegistry
    tokenizers: TokenizerStore
    dispatcher: Dispatcher
    options: Any  # GatewayOptions (kept untyped here to avoid an import cycle with main)
    models: ModelRegistry = field(default_factory=ModelRegistry)
    control: Any = None
    """The Control service (the admin API sends drain commands through it)."""
    launcher: Launcher | None = None
    """Starts local workers for the admin API's join; None where the gateway does not launch workers."""
    answers: AnswerCache | None = None
    """The response cache for deterministic answers; None when it is off."""
    traces: TraceStore = field(default_factory=TraceStore)
    preprocess: PreprocessPool | None = None
    """Helper processes for templating and tokenization; None tokenizes inline."""
    jobs: dict[str, dict] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)


def _error_payload(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, UpstreamError):
        return 502, responses.error_body(str(exc), "server_error", None, "worker_failed")
    return responses.error_for(exc)


def _error(exc: BaseException) -> JSONResponse:
    status, body = _error_payload(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from None


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="fleetserve gateway", docs_url=None, redoc_url=None)
    app.state.fleet = state
    keys = set(state.options.api_keys)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        request.state.arrived = time.monotonic()
        admin_key = getattr(state.options, "admin_key", "")
        if admin_key and request.url.path.startswith("/admin"):
            header = request.headers.get("authorization", "")
            if not (header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip(), admin_key)):
                body = responses.error_body(
                    "The admin API needs the admin key: send 'Authorization: Bearer ADMIN_KEY'.",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                return JSONResponse(body, status_code=401)
        elif keys and request.url.path not in PUBLIC_PATHS and not request.url.path.startswith("/console/"):
            header = request.headers.get("authorization", "")
            if not (header.startswith("Bearer ") and header[7:].strip() in keys):
                body = responses.error_body(
                    "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.exception_handler(FleetServeError)
    async def fleet_error(request: Request, exc: FleetServeError):
        return _error(exc)

    def begin(request: Request, model: str, body_id: str) -> tuple[str, Trace]:
        """The request's id (its X-Request-Id when it sent a usable one, else the answer's id) and its trace,
        which starts at the request's arrival with the receive span (reading and parsing the body)."""
        given = request.headers.get("x-request-id", "")
        rid = given if 0 < len(given) <= 128 and given.isprintable() else body_id
        request_id_var.set(rid)
        trace = state.traces.start(rid, model, arrived=getattr(request.state, "arrived", None))
        trace.add_span("receive", 0.0)
        return rid, trace

    async def preprocess(trace: Trace, encoding) -> list[int]:
        start = trace.elapsed()
        prompt = await encoding
        trace.add_span("preprocess", start, prompt_tokens=len(prompt))
        return prompt

    def tokenizer_for(model: str) -> Tokenizer:
        tok = state.tokenizers.get(model)
        if tok is None:
            if state.models.get(model) is not None:
                raise NoWorkerError(f"The model '{model}' has no worker yet; retry shortly.")
            known = ", ".join(state.models.names()) or "none yet"
            raise UnknownModelError(f"The model '{model}' does not exist or has no worker (served: {known}).")
        return tok

    def stream_response(body: AsyncIterator[bytes], media_type: str, rid: str) -> SlowClientStreamingResponse:
        return SlowClientStreamingResponse(
            body,
            media_type=media_type,
            headers={"X-Request-Id": rid},
            slow_client_timeout_s=state.options.slow_client_timeout_s,
            request_id=rid,
        )

    def sampling_for(req, prompt_len: int):
        """The request's SamplingParams, with its model's default temperature, top_p and max_tokens where it
        gave none."""
        spec = state.models.get(req.model)
        default_max = state.options.default_max_tokens
        if spec is not None:
            if req.temperature is None and spec.temperature is not None:
                req.temperature = spec.temperature
            if req.top_p is None and spec.top_p is not None:
                req.top_p = spec.top_p
            if spec.max_tokens is not None:
                default_max = spec.max_tokens
        return schema.to_sampling_params(req, default_max, prompt_len, state.tokenizers.max_model_len[req.model])

    async def encode_chat(model: str, tok: Tokenizer, messages: list[dict]) -> list[int]:
        if state.preprocess is not None:
            return await state.preprocess.encode_chat(state.tokenizers.folders[model], messages)
        return tok.encode_chat(messages)

    async def encode(model: str, tok: Tokenizer, text: str) -> list[int]:
        if state.preprocess is not None:
            return await state.preprocess.encode(state.tokenizers.folders[model], text)
        return tok.encode(text)

    # -- health --------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Ready when every model has at least one worker that really generates a token."""
        workers = [w for w in state.registry.workers.values() if w.routable]

        async def probe(w) -> tuple[Any, bool, str]:
            try:
                reply = await w.stub.Health(pb.HealthRequest(generate=True), timeout=10)
                return w, reply.ok, reply.detail
            except Exception as exc:  # any failure of the probe means not ready; reported in the body
                return w, False, str(exc)[:200]

        results = await asyncio.gather(*(probe(w) for w in workers))
        models: dict[str, dict] = {m: {"healthy_workers": 0, "workers": []} for m in state.registry.models()}
        for w, ok, detail in results:
            entry = models.setdefault(w.info.model, {"healthy_workers": 0, "workers": []})
            entry["healthy_workers"] += ok
            entry["workers"].append({"name": w.info.name, "ok": ok, "detail": detail})
        is_ready = bool(models) and all(m["healthy_workers"] > 0 for m in models.values())
        return JSONResponse({"ready": is_ready, "models": models}, status_code=200 if is_ready else 503)

    @app.get("/v1/models")
    async def list_models():
        """Every model the registry knows (configured, or learned from a worker), with its details and how many
        healthy workers serve it."""
        healthy: dict[str, int] = {}
        for w in state.registry.workers.values():
            healthy[w.info.model] = healthy.get(w.info.model, 0) + (w.state == WorkerState.HEALTHY)
        data = []
        for name in state.models.names():
            spec = state.models.get(name)
            if not spec.configured and name not in healthy:
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "fleetserve",
                    "fleetserve": {**spec.to_json(), "healthy_workers": healthy.get(name, 0)},
                }
            )
        return {"object": "list", "data": data}

    metrics = state.dispatcher.metrics
    metrics.set_worker_source(lambda: list(state.registry.workers.values()))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        """Prometheus text format: the gateway's own metrics and per-worker gauges from the heartbeats."""
        running: dict[str, int] = {}
        for w in state.registry.workers.values():
            running[w.info.model] = running.get(w.info.model, 0) + w.in_flight
        for model in set(running) | set(state.registry.models()):
            metrics.requests_running.labels(model=model).set(running.get(model, 0))
            metrics.requests_waiting.labels(model=model).set(state.dispatcher.admission.queued(model))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/requests/{request_id}/trace")
    async def request_trace(request_id: str):
        trace = state.traces.get(request_id)
        if trace is None:
            raise NotFoundError(f"No trace for request '{request_id}' (only recent requests are kept).", "request_id")
        return trace.to_json()

    # -- OpenAI ---------------------------------------------------------------------------------------------

    async def start(
        model: str,
        request_id: str,
        prompt: list[int],
        params,
        stops,
        priority: int,
        trace: Trace,
        affinity_key: str | None = None,
    ):
        """Begin generating; errors before the first event surface as HTTP errors, not as a broken stream."""
        if not state.traces.enabled:
            trace = None  # telemetry off: the dispatch and generation spans are not recorded
        events = generate_text(
            state.dispatcher,
            tokenizer_for(model),
            model,
            request_id,
            prompt,
            params,
            stops,
            priority,
            affinity_key,
            trace,
        )
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        return first, events

    async def all_events(first: TextEvent | None, events: AsyncIterator[TextEvent]) -> AsyncIterator[TextEvent]:
        if first is not None:
            yield first
        async for ev in events:
            yield ev

    async def collect(first: TextEvent | None, events: AsyncIterator[TextEvent]):
        """The whole answer: (text, log-probabilities, finish reason, usage)."""
        text, lps, last = "", [], first
        async for ev in all_events(first, events):
            text += ev.text
            lps += ev.logprobs
            last = ev
        return text, lps, (last.finish_reason if last else "stop"), (last.usage if last else Usage())

    async def respond(req, tok: Tokenizer, prompt: list[int], rid: str, cid: str, trace: Trace, chat: bool, request):
        """Run one OpenAI request (``rid`` its request id, ``cid`` the answer's id); a JSON body, or an SSE stream
        when it asked for one. Deterministic requests may be answered from the response cache."""
        params = sampling_for(req, len(prompt))
        want_lp = params.logprobs
        text_of = (lambda t: tok.decode([t], skip_special_tokens=False)) if want_lp is not None else None
        affinity = req.user or request.headers.get("x-session-id")
        stops = schema.stop_strings(req)
        key = None
        if state.answers is not None and not bypassed(request.headers.get("cache-control")):
            spec = state.models.get(req.model)
            version = spec.version if spec is not None else ""
            key = state.answers.key_for(req.model, version, prompt, params, stops, "chat" if chat else "completion")
        cached = await state.answers.lookup(key, req.model, trace) if key else None
        if cached is not None:
            first, events = None, state.answers.replay(cached)
        else:
            first, events = await start(req.model, rid, prompt, params, stops, req.priority, trace, affinity)
            if key:
                first, events = None, state.answers.recording(key, all_events(first, events))
        if not req.stream:
            text, lps, finish, usage = await collect(first, events)
            build = responses.chat_completion if chat else responses.completion
            answer = build(
                req.model, cid, text, finish, usage, logprobs=want_lp, token_logprobs=lps, token_text=text_of
            )
            return JSONResponse(answer, headers={"X-Request-Id": rid})
        stream_cls = responses.ChatStream if chat else responses.CompletionStream
        stream = stream_cls(req.model, cid, include_usage=req.include_usage, logprobs=want_lp, token_text=text_of)

        async def body() -> AsyncIterator[bytes]:
            if chat:  # a chat stream opens with the assistant role; a completion stream has no such chunk
                yield responses.sse(stream.first_chunk())
            try:
                async for ev in all_events(first, events):
                    chunk = stream.delta(ev.text, ev.logprobs or None)
                    if chunk is not None:
                        yield responses.sse(chunk)
                    if ev.finish_reason:
                        for c in stream.final(ev.finish_reason, ev.usage):
                            yield responses.sse(c)
            except FleetServeError as exc:  # failed mid-stream, retries spent: say so in the stream
                yield responses.sse(_error_payload(exc)[1])
            yield responses.SSE_DONE

        return stream_response(body(), "text/event-stream", rid)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = schema.parse_request(schema.ChatCompletionRequest, await _json_body(request))
        cid = responses.new_chat_id()
        rid, trace = begin(request, req.model, cid)
        tok = tokenizer_for(req.model)
        prompt = await preprocess(trace, encode_chat(req.model, tok, req.message_dicts()))
        return await respond(req, tok, prompt, rid, cid, trace, True, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = schema.parse_request(schema.CompletionRequest, await _json_body(request))
        cid = responses.new_completion_id()
        rid, trace = begin(request, req.model, cid)
        tok = tokenizer_for(req.model)
        if isinstance(req.prompt, list):
            prompt = list(req.prompt)
        else:
            prompt = await preprocess(trace, encode(req.model, tok, req.prompt))
        return await respond(req, tok, prompt, rid, cid, trace, False, request)

    # -- the original briefs' routes ------------------------------------------------------------------------

    async def simple_chat(request: Request, model: str, content: str, max_tokens: int | None):
        tok = tokenizer_for(model)
        req = schema.parse_request(
            schema.ChatCompletionRequest,
            {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        rid, trace = begin(request, model, uuid.uuid4().hex)
        prompt = await preprocess(trace, encode_chat(req.model, tok, req.message_dicts()))
        return rid, *await start(model, rid, prompt, sampling_for(req, len(prompt)), [], 0, trace)

    @app.post("/v1/chat/{model}")
    async def plain_chat(model: str, request: Request):
        """Plain-text prompt in, plain-text answer streamed out."""
        content = (await request.body()).decode("utf-8", errors="replace").strip()
        if not content:
            raise InvalidRequestError("The request body must be the prompt as plain text.", "body")
        rid, first, events = await simple_chat(request, model, content, None)

        async def body() -> AsyncIterator[bytes]:
            async for ev in all_events(first, events):
                if ev.text:
                    yield ev.text.encode("utf-8")

        return stream_response(body(), "text/plain; charset=utf-8", rid)

    @app.post("/coordinator/infer")
    async def coordinator_infer(request: Request):
        """{prompt, model, max_tokens} in; SSE events {token, finished} out."""
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        missing = [k for k in ("prompt", "model") if not body.get(k)]
        if missing:
            raise InvalidRequestError(f"Missing required field(s): {', '.join(missing)}.", missing[0])
        rid, first, events = await simple_chat(request, str(body["model"]), str(body["prompt"]), body.get("max_tokens"))

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for ev in all_events(first, events):
                    if ev.text or ev.finish_reason:
                        yield responses.sse({"token": ev.text, "finished": bool(ev.finish_reason)})
            except FleetServeError as exc:
                yield responses.sse({"token": "", "finished": True, "error": str(exc)})

        return stream_response(stream(), "text/event-stream", rid)

    @app.post("/v1/requests", status_code=202)
    async def submit(request: Request):
        """Polling mode: returns {request_id} at once; GET /v1/requests/{id} gives status and the result."""
        body = await _json_body(request)
        req = schema.parse_request(
            schema.ChatCompletionRequest, {**body, "stream": False} if isinstance(body, dict) else body
        )
        tok = tokenizer_for(req.model)
        rid, trace = begin(request, req.model, responses.new_chat_id())
        prompt = await preprocess(trace, encode_chat(req.model, tok, req.message_dicts()))
        params = sampling_for(req, len(prompt))
        job = {"request_id": rid, "status": "queued", "created": int(time.time()), "model": req.model}
        state.jobs[rid] = job
        while len(state.jobs) > POLL_KEEP:
            state.jobs.pop(next(iter(state.jobs)))

        async def run() -> None:
            try:
                first, events = await start(
                    req.model, rid, prompt, params, schema.stop_strings(req), req.priority, trace
                )
                job["status"] = "running"
                text, _, finish, usage = await collect(first, events)
                job["result"] = responses.chat_completion(req.model, rid, text, finish, usage)
                job["status"] = "completed"
            except FleetServeError as exc:
                job["status"] = "failed"
                job["error"] = _error_payload(exc)[1]["error"]

        task = asyncio.create_task(run())
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        return {"request_id": rid, "status": "queued"}

    @app.get("/v1/requests/{request_id}")
    async def poll(request_id: str):
        job = state.jobs.get(request_id)
        if job is None:
            raise NotFoundError(f"No request with id '{request_id}'.", "request_id")
        return job

    @app.get("/", include_in_schema=False)
    async def console():
        """The web console: a static page that uses this API from the browser."""
        return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html")

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    add_admin_routes(app, state)
    return app
