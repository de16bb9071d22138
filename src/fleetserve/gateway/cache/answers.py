"""What goes into the response cache: whole answers, keyed by request, replayed as the same stream of text events.

Only deterministic requests are cached: temperature 0 or a fixed seed, and no log-probabilities asked for.
The key covers the model, its version, the prompt's token ids, every sampling parameter, the stop strings and
the kind of route (chat or completion). A hit goes through the same response code as a generated answer
(streamed when the request asked for a stream) without touching a worker. ``Cache-Control: no-cache`` (or
``no-store``) on a request skips the lookup and the store. The store is blocking (SQLite or Redis), so it is
used from a thread.

Embeddings are kept per input, not per request: an input's vector is keyed by the model, its version and the
input's token ids, so a sentence seen in any earlier request is a hit, and a request whose inputs all hit never
reaches a worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

from fleetserve.contract import SamplingParams
from fleetserve.gateway.cache.keys import cache_key, is_cacheable
from fleetserve.gateway.cache.store import CacheBackend
from fleetserve.gateway.generation import TextEvent, Usage
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.tracing import Trace

log = logging.getLogger(__name__)


def bypassed(cache_control: str | None) -> bool:
    """Whether a request's ``Cache-Control`` header asks to skip the cache (``no-cache`` or ``no-store``)."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    return bool(directives & {"no-cache", "no-store"})


class AnswerCache:
    """Looks answers up in ``backend`` and stores finished ones there, with ``ttl_s`` (None: the backend's default)."""

    def __init__(self, backend: CacheBackend, metrics: GatewayMetrics, ttl_s: float | None = None):
        self.backend = backend
        self.metrics = metrics
        self.ttl_s = ttl_s

    def key_for(
        self, model: str, version: str, prompt: list[int], params: SamplingParams, stops: list[str], kind: str
    ) -> str | None:
        """The request's cache key, or None when its answer must not be cached."""
        if params.logprobs is not None or not is_cacheable(params.temperature, params.seed):
            return None
        return cache_key(model, version, prompt, {**asdict(params), "stop": list(stops), "kind": kind})

    async def lookup(self, key: str, model: str, trace: Trace) -> list[TextEvent] | None:
        start = trace.elapsed()
        try:
            raw = await asyncio.to_thread(self.backend.get, key)
        except Exception as exc:  # a broken cache must not fail the request: generate instead
            log.warning("response cache lookup failed: %s", exc)
            raw = None
        events = _decode(raw) if raw is not None else None
        trace.add_span("cache_lookup", start, hit=events is not None)
        if events is None:
            self.metrics.response_cache_misses_total.labels(model=model).inc()
        else:
            self.metrics.response_cache_hits_total.labels(model=model).inc()
            self.metrics.requests_total.labels(model=model, outcome="cached").inc()
            now = trace.elapsed()
            trace.add_span("finish", now, now, finish_reason=events[-1].finish_reason, cached=True)
            trace.close()
        return events

    def vector_key(self, model: str, version: str, input_ids: list[int]) -> str:
        """The cache key of one embedding input's vector."""
        return cache_key(model, version, input_ids, {"kind": "embedding"})

    async def lookup_vectors(self, keys: list[str], model: str) -> list[bytes | None]:
        """The stored vector (float32 bytes) of each key, None where there is none."""
        try:
            found = await asyncio.to_thread(lambda: [self.backend.get(k) for k in keys])
        except Exception as exc:  # a broken cache must not fail the request: embed instead
            log.warning("response cache lookup failed: %s", exc)
            found = [None] * len(keys)
        hits = sum(v is not None for v in found)
        if hits:
            self.metrics.response_cache_hits_total.labels(model=model).inc(hits)
        if hits < len(keys):
            self.metrics.response_cache_misses_total.labels(model=model).inc(len(keys) - hits)
        return found

    async def store_vectors(self, entries: list[tuple[str, bytes]]) -> None:
        """Keep each (key, vector bytes)."""

        def store() -> None:
            for key, value in entries:
                self.backend.set(key, value, self.ttl_s)

        try:
            await asyncio.to_thread(store)
        except Exception as exc:  # the answer was delivered; failing to keep it is only a warning
            log.warning("response cache store failed: %s", exc)

    async def replay(self, events: list[TextEvent]) -> AsyncIterator[TextEvent]:
        for event in events:
            yield event

    async def recording(self, key: str, events: AsyncIterator[TextEvent]) -> AsyncIterator[TextEvent]:
        """Pass ``events`` through; when they end with a finish reason, store the answer under ``key``."""
        seen: list[TextEvent] = []
        async for event in events:
            seen.append(event)
            if event.finish_reason:  # stored first: the reader may stop at the last event
                await self._store(key, seen)
            yield event

    async def _store(self, key: str, events: list[TextEvent]) -> None:
        last = events[-1]
        value = {
            "pieces": [e.text for e in events],
            "finish_reason": last.finish_reason,
            "usage": [last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens],
        }
        try:
            await asyncio.to_thread(self.backend.set, key, json.dumps(value).encode(), self.ttl_s)
        except Exception as exc:  # the answer was delivered; failing to keep it is only a warning
            log.warning("response cache store failed: %s", exc)


def _decode(raw: bytes) -> list[TextEvent] | None:
    try:
        value = json.loads(raw)
        pieces, finish = value["pieces"], value["finish_reason"]
        usage = Usage(*value["usage"])
    except (ValueError, KeyError, TypeError):
        return None  # an entry another version wrote, or a damaged one: a miss
    if not pieces:
        return None
    events = [TextEvent(piece, []) for piece in pieces]
    for event in events:
        event.usage = usage
    events[-1].finish_reason = finish
    return events
