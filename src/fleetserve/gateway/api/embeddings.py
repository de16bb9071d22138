"""The OpenAI-compatible /v1/embeddings route: its body, the inputs' tokenization and limits, the per-input response
cache, and the answer (float lists or base64 float32).

``input`` is a string, a list of strings, a list of token ids or a list of such lists; token ids are taken as the
model's own and get the model's special tokens around them only when the model's tokenizer adds them to text (an
encoder's ``[CLS] ... [SEP]``). Every input must be non-empty and fit the model's input limit: a longer one is a 400,
never silently cut. ``dimensions`` is accepted only when it equals the model's own size.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import sys
import time
from array import array
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from fleetserve.errors import CapacityError, InvalidRequestError, UpstreamError
from fleetserve.gateway.api import docs
from fleetserve.gateway.api.deps import (
    CHARS_PER_TOKEN_BOUND,
    StateDep,
    begin_trace,
    caller,
    check_kind,
    json_body,
    tokenizer_for,
)
from fleetserve.gateway.api.embedding_schema import EmbeddingRequest
from fleetserve.gateway.api.schema import ContextLengthExceededError
from fleetserve.gateway.api.schema import parse_request as parse_body
from fleetserve.gateway.cache import bypassed
from fleetserve.gateway.models import EMBED_KIND
from fleetserve.gateway.state import GatewayState
from fleetserve.text.tokenizer import Tokenizer

router = APIRouter()


def _check_sizes(req: EmbeddingRequest, tok: Tokenizer, limit: int) -> None:
    """Refuse, before tokenizing, inputs that cannot fit ``limit`` tokens, and token ids outside the vocabulary."""
    if req.texts:
        for i, text in enumerate(req.input):
            if len(text) > CHARS_PER_TOKEN_BOUND * limit:
                raise ContextLengthExceededError(
                    f"This model's maximum input length is {limit} tokens. However, input[{i}] has {len(text)} "
                    f"characters, more than any {limit} tokens can hold. Please shorten it.",
                    f"input[{i}]",
                )
        return
    vocab = len(tok)
    for i, ids in enumerate(req.input):
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad} is not in the model's vocabulary (0..{vocab - 1}).", f"input[{i}]"
            )


def _check_lengths(inputs: list[list[int]], limit: int) -> None:
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            raise ContextLengthExceededError(
                f"This model's maximum input length is {limit} tokens. However, input[{i}] has {len(ids)} tokens. "
                "Please shorten it.",
                f"input[{i}]",
            )


def _floats(raw: bytes) -> list[float]:
    """float32 little-endian bytes -> Python floats."""
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def answer_body(model: str, vectors: list[bytes], prompt_tokens: int, encoding: str | None) -> dict[str, Any]:
    """The OpenAI ``list`` of ``embedding`` objects, each vector as floats or as base64 of its float32 bytes."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(raw).decode("ascii") if encoding == "base64" else _floats(raw),
        }
        for i, raw in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


async def embed_inputs(
    state: GatewayState, req: EmbeddingRequest, request_id: str, tag: str, arrived: float | None, use_cache: bool
) -> tuple[list[bytes], int]:
    """Each input's vector (float32 bytes) and the inputs' token count: from the response cache where it holds
    them, the rest from a worker in one call."""
    model = req.model
    tok = tokenizer_for(state, model)
    check_kind(state, model, EMBED_KIND)
    spec = state.models.get(model)
    if req.dimensions is not None and spec is not None and spec.dimensions and req.dimensions != spec.dimensions:
        raise InvalidRequestError(
            f"The model '{model}' makes vectors of {spec.dimensions} dimensions and cannot shorten them: "
            f"'dimensions' must be {spec.dimensions} or left out.",
            "dimensions",
        )
    limit = state.tokenizers.max_model_len[model]
    _check_sizes(req, tok, limit)
    _, trace = begin_trace(state, model, request_id, tag, arrived)
    metrics = state.dispatcher.metrics
    started, outcome = time.monotonic(), "error"  # None: not counted (the request was wrong)
    try:
        start = trace.elapsed()
        if req.texts:
            inputs = await state.preprocess.encode_inputs(model, list(req.input))
        else:
            inputs = [list(ids) for ids in req.input]
        trace.add_span("preprocess", start, inputs=len(inputs), prompt_tokens=sum(len(i) for i in inputs))
        _check_lengths(inputs, limit)
        vectors: list[bytes | None] = [None] * len(inputs)
        answers = state.answers if use_cache else None
        keys: list[str] = []
        if answers is not None:
            version = spec.version if spec is not None else ""
            keys = [answers.vector_key(model, version, ids) for ids in inputs]
            start = trace.elapsed()
            vectors = await answers.lookup_vectors(keys, model)
            trace.add_span("cache_lookup", start, hits=sum(v is not None for v in vectors))
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            dispatch_trace = trace if state.traces.enabled else None
            worker, reply = await state.dispatcher.embed(
                model, request_id, [inputs[i] for i in missing], dispatch_trace
            )
            size = reply.dimensions * 4
            if len(reply.vectors) != size * len(missing):
                raise UpstreamError(f"worker {worker.name} sent vectors of the wrong size")  # a worker's fault: 502
            fresh = [reply.vectors[n * size : (n + 1) * size] for n in range(len(missing))]
            for i, raw in zip(missing, fresh):
                vectors[i] = raw
            end = trace.elapsed()
            trace.add_span(
                "embed",
                max(0.0, end - reply.compute_s),
                end,
                worker=worker.name,
                worker_queue_s=round(reply.queue_s, 6),
                batches=reply.batches,
            )
            if answers is not None:
                await answers.store_vectors([(keys[i], vectors[i]) for i in missing])
        prompt_tokens = sum(len(i) for i in inputs)
        metrics.prompt_tokens_total.labels(model=model).inc(prompt_tokens)
        metrics.e2e_request_latency_seconds.labels(model=model).observe(time.monotonic() - started)
        outcome = "ok" if missing else "cached"
        now = trace.elapsed()
        trace.add_span("finish", now, now)
        return vectors, prompt_tokens  # type: ignore[return-value]
    except InvalidRequestError:
        outcome = None
        raise
    except CapacityError:
        outcome = "rejected"
        raise
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        if outcome is not None:
            metrics.requests_total.labels(model=model, outcome=outcome).inc()
        trace.close()


@router.post(
    "/v1/embeddings",
    openapi_extra=docs.json_body("EmbeddingRequest"),
    responses=docs.answers({200: ("A list of embedding objects, one per input, in input order.", None)}),
)
async def embeddings(request: Request, state: StateDep) -> JSONResponse:
    body = await json_body(request)
    req = parse_body(EmbeddingRequest, body)
    request_id = request.headers.get("x-request-id", "") or f"embd-{secrets.token_hex(12)}"
    arrived = getattr(request.state, "arrived", None)
    use_cache = not bypassed(request.headers.get("cache-control"))
    vectors, tokens = await embed_inputs(state, req, request_id, caller(request).tag, arrived, use_cache)
    return JSONResponse(
        answer_body(req.model, vectors, tokens, req.encoding_format), headers={"X-Request-Id": request_id}
    )
