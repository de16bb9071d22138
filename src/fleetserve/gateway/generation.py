"""Text in, text out over the workers: tokenized prompt -> dispatch -> incremental detokenization -> stop strings.

Every route (OpenAI, the plain-text and SSE routes, polling) goes through ``generate_text``, so they all stream
the same text. When a stop string appears, the stream ends with finish_reason "stop" and closing the dispatch
stream cancels the call, which aborts the request on the worker. ``Started`` holds a generation whose first event
has arrived, so that errors before it surface as exceptions (HTTP errors), not as a broken stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from fleetserve.contract import SamplingParams, TokenLogprob
from fleetserve.errors import CapacityError
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.pipeline_state import hop_json
from fleetserve.protocol import convert
from fleetserve.telemetry.tracing import Trace
from fleetserve.text.detokenizer import IncrementalDetokenizer
from fleetserve.text.stop import StopStringMatcher
from fleetserve.text.tokenizer import Tokenizer


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextEvent:
    """A piece of the answer, as it becomes safe to show."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    """None until the last event; then "stop" or "length"."""
    usage: Usage = field(default_factory=Usage)
    worker: str = ""


def chunk_text(
    detok: IncrementalDetokenizer, matcher: StopStringMatcher | None, token_ids: list[int], finish: bool
) -> tuple[str, bool, int]:
    """A chunk's text after the stop strings: (text, stopped, how many of its tokens that text took).

    A chunk of several tokens (a speculative step) goes through the matcher one token at a time, so that a stop
    inside it also ends the chunk's tokens and log-probabilities (and the usage) where the text ends."""
    if matcher is None:
        text = detok.add(token_ids)
        return (text + detok.flush() if finish else text), False, len(token_ids)
    pieces: list[str] = []
    groups = [[token] for token in token_ids] if len(token_ids) > 1 else [token_ids]
    for used, group in enumerate(groups, 1):
        piece, stopped = matcher.feed(detok.add(group))
        pieces.append(piece)
        if stopped:
            return "".join(pieces), True, min(used, len(token_ids))
    if finish:
        piece, stopped = matcher.feed(detok.flush())
        pieces.append(piece)
        if not stopped:
            pieces.append(matcher.flush())  # overlapping stops can still match in what was held back
            stopped = matcher.stopped
        return "".join(pieces), stopped, len(token_ids)
    return "".join(pieces), False, len(token_ids)


async def generate_text(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    model: str,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    stops: list[str] | None = None,
    priority: int = 0,
    affinity_key: str | None = None,
    trace: Trace | None = None,
    session: str | None = None,
) -> AsyncIterator[TextEvent]:
    """Yield text events until the request finishes (a stop string, EOS or the length limit)."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    matcher = StopStringMatcher(stops) if stops else None
    usage = Usage(prompt_tokens=len(prompt))
    stream = dispatcher.generate(model, request_id, prompt, params, priority, affinity_key, trace, session)
    metrics = dispatcher.metrics
    arrived = time.monotonic() - (trace.elapsed() if trace else 0.0)
    first_token_at: float | None = None
    last_chunk_at = arrived
    busy, outcome = 0.0, "cancelled"  # time spent detokenizing and matching stop strings; how it ended
    try:
        async for worker, chunk in stream:
            began = time.monotonic()
            if first_token_at is None:
                first_token_at = began - arrived
                metrics.time_to_first_token_seconds.labels(model=model).observe(first_token_at)
                itl = metrics.inter_token_latency_seconds.labels(model=model)  # once, not per chunk
            elif chunk.token_ids:  # a chunk of several tokens (a stream interval, speculation): their mean gap
                itl.observe((began - last_chunk_at) / len(chunk.token_ids))
            last_chunk_at = began
            usage.completion_tokens = chunk.num_output_tokens
            usage.cached_tokens = chunk.num_cached_tokens
            # "abort" reaches a client only when the worker ended the request itself: report it as a stop
            finish = "stop" if chunk.finish_reason == "abort" else (chunk.finish_reason or None)
            token_ids = list(chunk.token_ids)
            logprobs = convert.logprobs_from_chunk(chunk)
            text, stopped, used = chunk_text(detok, matcher, token_ids, bool(finish))
            if used < len(token_ids):  # a stop string ended the text inside a chunk of several tokens
                usage.completion_tokens -= len(token_ids) - used
                token_ids, logprobs = token_ids[:used], logprobs[:used]
            if stopped:
                finish = "stop"
            busy += time.monotonic() - began
            if finish:
                outcome = "ok"
                end = time.monotonic() - arrived
                metrics.e2e_request_latency_seconds.labels(model=model).observe(end)
                metrics.prompt_tokens_total.labels(model=model).inc(usage.prompt_tokens)
                metrics.generation_tokens_total.labels(model=model).inc(usage.completion_tokens)
                if trace:
                    end = trace.elapsed()
                    hops = {"hops": [hop_json(h) for h in chunk.decode_hops]} if chunk.decode_hops else {}
                    if hops:
                        hops["steps"] = chunk.decode_steps
                    trace.add_span(
                        "decode", first_token_at or end, end, completion_tokens=usage.completion_tokens, **hops
                    )
                    trace.add_span("postprocess", max(0.0, end - busy), end, note="detokenization and stop strings")
                    trace.add_span("finish", end, end, finish_reason=finish)
            yield TextEvent(text, token_ids, logprobs, finish, usage, worker.info.name)
            if finish:
                return
    except CapacityError:
        outcome = "rejected"
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.requests_total.labels(model=model, outcome=outcome).inc()
        await stream.aclose()
        if trace:
            trace.close()


@dataclass
class Started:
    """A generation past its first event (``first`` is None when it ended without one, or for a replayed answer)."""

    first: TextEvent | None
    rest: AsyncIterator[TextEvent]

    @classmethod
    async def of(cls, events: AsyncGenerator[TextEvent, None]) -> Started:
        """Wait for the first event of ``events``; an error before it closes ``events`` and is raised here."""
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        return cls(first, events)

    async def events(self) -> AsyncIterator[TextEvent]:
        """Every event: the first, then the rest."""
        if self.first is not None:
            yield self.first
        async for ev in self.rest:
            yield ev

    async def collect(self) -> tuple[str, list[TokenLogprob], str, Usage]:
        """The whole answer: (text, log-probabilities, finish reason, usage)."""
        text, lps, last = "", [], self.first
        async for ev in self.events():
            text += ev.text
            lps += ev.logprobs
            last = ev
        return text, lps, (last.finish_reason if last else "stop"), (last.usage if last else Usage())
