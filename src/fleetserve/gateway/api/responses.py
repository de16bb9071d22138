"""OpenAI response bodies: owns the JSON of chat completions, completions, their streamed chunks, SSE framing and
error bodies.

The shapes are those the ``openai`` client parses (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``).
Decisions:

* ``finish_reason`` is "stop" (EOS, a stop token or a stop string) or "length"; the engine's "abort" never reaches a
  client that is still connected, so it is refused here (ValueError) rather than mapped.
* Logprob token strings come from a ``token_text(token_id) -> str`` callable (the gateway passes the tokenizer's
  decode); ``bytes`` is that string's UTF-8. Non-finite log-probabilities are written as -9999.0 (JSON has no
  infinities). Completions' ``text_offset`` counts characters from the start of the generated text (echo is not
  supported), advancing by each token string's length.
* Errors: InvalidRequestError -> 400 ``invalid_request_error`` (with ``param``, and ``code`` when the exception has
  one, e.g. ``context_length_exceeded``); UnknownModelError -> 404 ``invalid_request_error`` / ``model_not_found``;
  NotFoundError (a request id, a worker) -> 404 ``invalid_request_error`` / ``not_found`` with ``param``; CapacityError -> 503 ``server_error`` / ``overloaded`` (the condition is usually temporary, and the ``openai``
  client retries 503s with back-off, as it does for OpenAI's own "engine overloaded" answers); anything else -> 500
  ``server_error`` with a generic message (internal details are logged, not sent).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from fleetserve.contract import TokenLogprob
from fleetserve.errors import CapacityError, InvalidRequestError, NotFoundError, UnknownModelError

if TYPE_CHECKING:
    from typing_extensions import Unpack

TokenText = Callable[[int], str]
"""Maps a token id to its text, e.g. ``lambda i: tokenizer.decode([i], skip_special_tokens=False)``."""

SSE_DONE = b"data: [DONE]\n\n"
"""The last event of every OpenAI stream."""

FINISH_REASONS = ("stop", "length")
UNAVAILABLE_LOGPROB = -9999.0
"""Written in place of -inf / NaN log-probabilities."""


class UsageCounts(Protocol):
    """Token counts of one request (any object with these attributes, e.g. the gateway's Usage)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def new_chat_id() -> str:
    """A fresh chat completion id, ``chatcmpl-<32 hex digits>``."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def new_completion_id() -> str:
    """A fresh completion id, ``cmpl-<32 hex digits>``."""
    return f"cmpl-{uuid.uuid4().hex}"


def usage_body(usage: UsageCounts) -> dict[str, Any]:
    """OpenAI's ``usage`` object, with ``prompt_tokens_details.cached_tokens``."""
    prompt, completion = int(usage.prompt_tokens), int(usage.completion_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(getattr(usage, "cached_tokens", 0) or 0)},
    }


def _finish(reason: str) -> str:
    """Check a finish reason that is about to be sent."""
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {reason!r}")
    return reason


def _logprob(value: float) -> float:
    """A JSON-safe log-probability."""
    value = float(value)
    return value if math.isfinite(value) else UNAVAILABLE_LOGPROB


def _require_token_text(logprobs: int | None, token_text: TokenText | None) -> None:
    """Log-probabilities need a way to name tokens."""
    if logprobs is not None and token_text is None:
        raise ValueError("token_text is required when logprobs are requested")
    if logprobs is not None and logprobs < 0:
        raise ValueError(f"logprobs (the number of alternatives) must be >= 0, got {logprobs}")


def chat_logprobs_content(
    token_logprobs: Sequence[TokenLogprob], token_text: TokenText, top_logprobs: int
) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries: token, logprob, bytes and up to ``top_logprobs`` alternatives each."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}

    out = []
    for lp in token_logprobs:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(tid, value) for tid, value in lp.top[:top_logprobs]]
        out.append(item)
    return out


def completion_logprobs(
    token_logprobs: Sequence[TokenLogprob], token_text: TokenText, top_logprobs: int, text_offset: int = 0
) -> dict[str, Any]:
    """Completions ``logprobs``: parallel lists tokens / token_logprobs / top_logprobs (token -> logprob, at most
    ``top_logprobs`` entries; a token string seen twice keeps the likelier) / text_offset (from ``text_offset``)."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    offset = text_offset
    for lp in token_logprobs:
        text = token_text(lp.token_id)
        tokens.append(text)
        values.append(_logprob(lp.logprob))
        top: dict[str, float] = {}
        for tid, value in lp.top[:top_logprobs]:
            top.setdefault(token_text(tid), _logprob(value))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class _Stream:
    """Fields shared by both streams."""

    object_name = ""

    def __init__(
        self,
        model: str,
        request_id: str,
        created: int | None = None,
        include_usage: bool = False,
        logprobs: int | None = None,
        token_text: TokenText | None = None,
        system_fingerprint: str | None = None,
    ) -> None:
        _require_token_text(logprobs, token_text)
        self.model = model
        self.request_id = request_id
        self.created = int(time.time()) if created is None else int(created)
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.token_text = token_text
        self.system_fingerprint = system_fingerprint
        self.finished = False

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A chunk envelope; ``usage`` is null on every chunk but the last when usage was asked for."""
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        return body

    def _usage_chunk(self, usage: UsageCounts | None) -> list[dict[str, Any]]:
        """The closing usage chunk (empty choices) when asked for."""
        if not self.include_usage:
            return []
        if usage is None:
            raise ValueError("usage is required when include_usage is set")
        body = self._chunk([])
        body["usage"] = usage_body(usage)
        return [body]

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError("the stream already ended")


class ChatStream(_Stream):
    """Builds the ``chat.completion.chunk`` objects of one streamed chat completion (one choice, index 0).

    ``logprobs`` is None (not requested) or how many alternatives to list per token (``top_logprobs``).
    """

    object_name = "chat.completion.chunk"

    def _choice(self, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def first_chunk(self) -> dict[str, Any]:
        """The opening chunk: role "assistant" and empty content."""
        self._check_open()
        return self._chunk([self._choice({"role": "assistant", "content": ""})])

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any] | None:
        """A content chunk, or None when there is neither text nor (requested) log-probabilities to send."""
        self._check_open()
        entries = None
        if self.logprobs is not None and logprobs:
            assert self.token_text is not None
            entries = {"content": chat_logprobs_content(logprobs, self.token_text, self.logprobs), "refusal": None}
        if not text and entries is None:
            return None
        return self._chunk([self._choice({"content": text}, entries)])

    def final(self, finish_reason: str, usage: UsageCounts | None = None) -> list[dict[str, Any]]:
        """The finish chunk (empty delta), then the usage chunk (empty choices) when include_usage."""
        self._check_open()
        chunks = [self._chunk([self._choice({}, None, _finish(finish_reason))])]
        chunks += self._usage_chunk(usage)
        self.finished = True
        return chunks


class CompletionStream(_Stream):
    """Builds the ``text_completion`` chunks of one streamed completion (one choice, index 0).

    ``logprobs`` is None (not requested) or how many alternatives to list per token. Unlike chat, there is no
    opening chunk; intermediate chunks carry ``finish_reason: null`` as OpenAI's do.
    """

    object_name = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as ChatStream."""
        super().__init__(*args, **kwargs)
        self._offset = 0

    def _choice(self, text: str, logprobs: Any = None, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any] | None:
        """A text chunk, or None when there is neither text nor (requested) log-probabilities to send."""
        self._check_open()
        entries = None
        if self.logprobs is not None and logprobs:
            assert self.token_text is not None
            entries = completion_logprobs(logprobs, self.token_text, self.logprobs, self._offset)
        if not text and entries is None:
            return None
        self._offset += len(text)
        return self._chunk([self._choice(text, entries)])

    def final(self, finish_reason: str, usage: UsageCounts | None = None) -> list[dict[str, Any]]:
        """The finish chunk (empty text), then the usage chunk (empty choices) when include_usage."""
        self._check_open()
        chunks = [self._chunk([self._choice("", None, _finish(finish_reason))])]
        chunks += self._usage_chunk(usage)
        self.finished = True
        return chunks


class AnswerOptions(TypedDict, total=False):
    """The keyword options of ``chat_completion`` and ``completion``."""

    created: int | None
    """Unix time of the answer (default: now)."""
    logprobs: int | None
    """None (not requested) or the number of alternatives listed per token."""
    token_logprobs: Sequence[TokenLogprob] | None
    """The generated tokens' log-probabilities, when requested."""
    token_text: TokenText | None
    """Names tokens; required when ``logprobs`` is set."""
    system_fingerprint: str | None


def _answer_logprobs(options: AnswerOptions, build: Callable[[Sequence[TokenLogprob], TokenText, int], Any]) -> Any:
    """``build(token_logprobs, token_text, alternatives)`` when log-probabilities were requested, else None."""
    logprobs, token_text = options.get("logprobs"), options.get("token_text")
    _require_token_text(logprobs, token_text)
    if logprobs is None:
        return None
    assert token_text is not None
    return build(options.get("token_logprobs") or [], token_text, logprobs)


def _response(
    object_name: str, model: str, request_id: str, choice: dict[str, Any], usage: UsageCounts, options: AnswerOptions
) -> dict[str, Any]:
    """The envelope both non-streamed bodies share, around their one choice."""
    created = options.get("created")
    return {
        "id": request_id,
        "object": object_name,
        "created": int(time.time()) if created is None else int(created),
        "model": model,
        "system_fingerprint": options.get("system_fingerprint"),
        "choices": [{"index": 0, **choice}],
        "usage": usage_body(usage),
    }


def chat_completion(
    model: str, request_id: str, text: str, finish_reason: str, usage: UsageCounts, **options: Unpack[AnswerOptions]
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body (``options``: see AnswerOptions)."""
    content = _answer_logprobs(options, chat_logprobs_content)
    choice = {
        "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
        "logprobs": None if content is None else {"content": content, "refusal": None},
        "finish_reason": _finish(finish_reason),
    }
    return _response("chat.completion", model, request_id, choice, usage, options)


def completion(
    model: str, request_id: str, text: str, finish_reason: str, usage: UsageCounts, **options: Unpack[AnswerOptions]
) -> dict[str, Any]:
    """A non-streamed ``text_completion`` body (``options``: see AnswerOptions)."""
    logprobs = _answer_logprobs(options, completion_logprobs)
    choice = {"text": text, "logprobs": logprobs, "finish_reason": _finish(finish_reason)}
    return _response("text_completion", model, request_id, choice, usage, options)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (a string is sent as is, e.g. "[DONE]")."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and error body for an exception (see the module docstring for the mapping)."""
    if isinstance(exc, InvalidRequestError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param, getattr(exc, "code", None))
    if isinstance(exc, UnknownModelError):
        return 404, error_body(str(exc), "invalid_request_error", None, "model_not_found")
    if isinstance(exc, NotFoundError):
        return 404, error_body(str(exc), "invalid_request_error", exc.param, "not_found")
    if isinstance(exc, CapacityError):
        return 503, error_body(str(exc), "server_error", None, "overloaded")
    return 500, error_body("The server had an error while processing your request.", "server_error")
