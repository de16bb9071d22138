"""OpenAI request bodies: owns parsing /v1/chat/completions and /v1/completions requests and turning them into
SamplingParams and stop strings.

Parsing is strict about types (a string is not a number, a bool is not an integer) and lenient about fields: unknown
fields are ignored, and every known field may be null (meaning "not given"). Every rejection is an
``InvalidRequestError`` whose ``param`` names the field (``messages[0].content``, ``temperature``, ...), so the route
can answer 400 with it. Fields that would change the result but are not supported (``n`` > 1, ``echo``, tools,
``logit_bias``, structured ``response_format``, ``suffix``, batched prompts) are rejected, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetserve.contract import SamplingParams
from fleetserve.errors import InvalidRequestError
from fleetserve.protocol.security import PRIORITY_MAX, PRIORITY_MIN

MAX_STOP_STRINGS = 4
"""OpenAI's limit on the number of stop strings."""
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
CONTENT_PART_SEPARATOR = "\n"
"""Text content parts of one message are joined with this."""

MAX_MODEL_NAME_CHARS = 256
_INT32 = 2**31
_UINT32 = 2**32


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the requested completion do not fit in the model's context window (OpenAI's error code
    ``context_length_exceeded``)."""

    code = "context_length_exceeded"


class _FieldError(ValueError):
    """Raised inside validators: ``suffix`` extends the field path the error is reported at (e.g. ``[1].type``)."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.suffix = suffix


class _Model(BaseModel):
    """Base of the request models: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Model):
    """``stream_options``: only ``include_usage`` has an effect."""

    include_usage: bool | None = None


class ChatMessage(_Model):
    """One chat message. ``content`` is normalised to a string (text parts joined with CONTENT_PART_SEPARATOR)."""

    role: str = Field(min_length=1)
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        """Accept a string or a list of ``{"type": "text", "text": ...}`` parts; reject other part types."""
        if value is None:
            raise _FieldError("content must be a string or a list of text parts (tool calls are not supported)")
        if not isinstance(value, list):
            return value  # strings pass; other types get pydantic's type error
        texts: list[str] = []
        for i, part in enumerate(value):
            if not isinstance(part, Mapping):
                raise _FieldError("each content part must be an object like {'type': 'text', 'text': '...'}", f"[{i}]")
            kind = part.get("type")
            if kind != "text":
                raise _FieldError(f"only 'text' content parts are supported, got {kind!r}", f"[{i}].type")
            text = part.get("text")
            if not isinstance(text, str):
                raise _FieldError("a text content part needs a string 'text'", f"[{i}].text")
            texts.append(text)
        return CONTENT_PART_SEPARATOR.join(texts)

    def to_dict(self) -> dict[str, str]:
        """The message as the chat template wants it: role, content, and name when given."""
        out = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        return out


def _check_stop(value: Any) -> Any:
    """Normalise ``stop`` to a list of at most MAX_STOP_STRINGS non-empty strings (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _FieldError("stop must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise _FieldError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
    for i, stop in enumerate(value):
        if not isinstance(stop, str):
            raise _FieldError(f"stop[{i}] must be a string, got {type(stop).__name__}")
        if not stop:
            raise _FieldError(f"stop strings must not be empty (stop[{i}] is)")
    return value


def _token_ids_prompt(value: list[Any], where: str = "prompt") -> list[int]:
    """Check a list of prompt token ids (``where`` names the list in error messages)."""
    if not value:
        raise _FieldError("prompt must not be empty")
    for i, token in enumerate(value):
        if not isinstance(token, int) or isinstance(token, bool):
            raise _FieldError(
                f"prompt must be a string, a list of token ids, or a list with one of those ({where}[{i}] is "
                f"{type(token).__name__})"
            )
        if not 0 <= token < _UINT32:
            raise _FieldError(f"token ids must be >= 0 and < 2**32 ({where}[{i}] is {token})")
    return value


def _normalize_prompt(value: Any) -> Any:
    """A string, a list of token ids, or a one-element list holding either -> a string or a list of token ids.

    Several prompts in one request (OpenAI's batch form) are rejected.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _FieldError("prompt must be a string or a list of token ids")
    if value and all(isinstance(v, (str, list)) for v in value):
        if len(value) > 1:
            raise _FieldError(f"only one prompt per request is supported, got {len(value)} prompts")
        inner = value[0]
        return inner if isinstance(inner, str) else _token_ids_prompt(inner, "prompt[0]")
    return _token_ids_prompt(value)


class _SamplingFields(_Model):
    """Fields shared by both endpoints."""

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    """None means OpenAI's default, 1.0."""
    top_p: float | None = None
    top_k: int | None = Field(default=None, json_schema_extra={"minimum": -1, "maximum": _INT32 - 1})
    """Extension: 0 or -1 means no top-k cut."""
    min_p: float | None = None
    """Extension."""
    seed: int | None = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 2**63 - 1})
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    """Extension: 1 means none."""
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    """Extension: keep generating past EOS (until max_tokens or a stop string)."""
    min_tokens: int | None = Field(default=None, ge=0)
    """Extension: EOS and stop token ids are not sampled before this many tokens."""
    stop_token_ids: list[int] | None = None
    """Extension: token ids that end the completion, besides the model's EOS."""
    speculative: bool | None = None
    """Extension: false opts this request out of speculative decoding on workers that have it on (the output is
    the same; only the work per step changes)."""
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    """Extension: smaller runs first; equal priorities run in arrival order."""
    session_id: str | None = Field(default=None, max_length=128)
    """Extension: a conversation session (as the X-Session-Id header): its KV stays on its worker between turns."""
    logit_bias: dict[str, Any] | None = None
    """Not supported: only null or {} is accepted."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        """See ``_check_stop``."""
        return _check_stop(value)

    @field_validator("priority", mode="before")
    @classmethod
    def _default_priority(cls, value: Any) -> Any:
        """null means the default priority, 0."""
        return 0 if value is None else value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        """Only one choice per request."""
        if value is not None and value != 1:
            raise _FieldError(f"only n=1 is supported, got {value}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """logit_bias is not implemented; refuse it rather than ignore it."""
        if value:
            raise _FieldError("logit_bias is not supported")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        """Token ids are in [0, 2**32)."""
        for i, token in enumerate(value or []):
            if not 0 <= token < _UINT32:
                raise _FieldError(f"token ids must be >= 0 and < 2**32 (stop_token_ids[{i}] is {token})")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """A /v1/chat/completions body, as the ``openai`` client sends it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Takes precedence over ``max_tokens``."""
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[Any] | None = None
    """Not supported: only null or [] is accepted."""
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}`` is accepted."""

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        """Tool calling is not implemented."""
        if value:
            raise _FieldError("tools (function calling) are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Structured output is not implemented."""
        if value is not None and value.get("type", "text") != "text":
            raise _FieldError(f"only response_format type 'text' is supported, got {value.get('type')!r}", ".type")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        """OpenAI requires logprobs=true when top_logprobs is used."""
        if self.top_logprobs and not self.logprobs:
            raise _FieldError("logprobs must be true to use top_logprobs", "top_logprobs")
        return self

    @field_validator("messages", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        """A clearer message than pydantic's for an empty list."""
        if isinstance(value, list) and not value:
            raise _FieldError("messages must not be empty")
        return value

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as plain dicts for ``Tokenizer.apply_chat_template`` / ``encode_chat``."""
        return [m.to_dict() for m in self.messages]

    @property
    def max_tokens_param(self) -> str:
        """The field the completion budget was given in (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``, else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    """A /v1/completions body. ``prompt`` is normalised to one string or one list of token ids."""

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """See ``_normalize_prompt``."""
        return _normalize_prompt(value)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        """Echoing the prompt back is not implemented."""
        if value:
            raise _FieldError("echo=true is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        """Only one candidate per request."""
        if value is not None and value != 1:
            raise _FieldError(f"only best_of=1 is supported, got {value}")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        """Insertion (text after the completion) is not implemented."""
        if value:
            raise _FieldError("suffix is not supported")
        return value

    @property
    def max_tokens_param(self) -> str:
        """The field the completion budget was given in (for error messages)."""
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_tokens``, or None."""
        return self.max_tokens


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


def _param_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _short(value: Any) -> str:
    """A short repr of an offending input for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_invalid_request(exc: ValidationError) -> InvalidRequestError:
    """The first pydantic error as an InvalidRequestError with the field path as ``param``."""
    err = exc.errors()[0]
    param = _param_path(tuple(err["loc"]))
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        param += cause.suffix
        return InvalidRequestError(f"Invalid value for '{param}': {cause}.", param or None)
    if err["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param or None)
    message = err["msg"][0].lower() + err["msg"][1:]
    return InvalidRequestError(
        f"Invalid value for '{param}': {message}, got {_short(err.get('input'))}.", param or None
    )


def parse_request(model_cls: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body into ``model_cls``; any problem raises InvalidRequestError naming the field."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(dict(body))
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def stop_strings(req: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """The request's stop strings, without duplicates, in the order given (empty when none)."""
    return list(dict.fromkeys(req.stop or []))


def _context_error(
    req: ChatCompletionRequest | CompletionRequest, prompt_len: int, max_tokens: int | None, max_model_len: int
) -> ContextLengthExceededError:
    """OpenAI's context-length message with the token counts."""
    what = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if max_tokens is None:
        return ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {what} resulted in "
            f"{prompt_len} tokens. Please reduce the length of the {what}.",
            what,
        )
    param = what if prompt_len >= max_model_len else req.max_tokens_param
    return ContextLengthExceededError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
        f"Please reduce the length of the {what} or completion.",
        param,
    )


def _first_given(value: float | None, default: float | None, fallback: float) -> float:
    """``value``, else ``default``, else ``fallback``, as a float."""
    if value is not None:
        return float(value)
    return fallback if default is None else float(default)


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    default_max_tokens: int,
    prompt_len: int,
    max_model_len: int,
    *,
    default_temperature: float | None = None,
    default_top_p: float | None = None,
) -> SamplingParams:
    """Validated SamplingParams for ``req`` with a prompt of ``prompt_len`` tokens.

    Without max_tokens (or max_completion_tokens) the budget is what the context window leaves, capped by
    ``default_max_tokens``. A temperature or top_p the request does not give is ``default_temperature`` or
    ``default_top_p`` (a model's defaults), else OpenAI's 1.0; ``req`` itself is left as parsed. Raises InvalidRequestError for an empty prompt, ContextLengthExceededError (an
    InvalidRequestError) when the prompt plus the budget exceed ``max_model_len``, and InvalidRequestError naming
    the request field for any value out of range.
    """
    what = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len < 1:
        raise InvalidRequestError(f"The {what} must not be empty: it gave 0 tokens.", what)
    requested = req.requested_max_tokens
    room = max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise _context_error(req, prompt_len, None, max_model_len)
        max_tokens = min(default_max_tokens, room)
    else:
        if requested > room:
            raise _context_error(req, prompt_len, requested, max_model_len)
        max_tokens = requested
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        temperature=_first_given(req.temperature, default_temperature, 1.0),
        top_p=_first_given(req.top_p, default_top_p, 1.0),
        top_k=req.top_k or 0,
        min_p=0.0 if req.min_p is None else float(req.min_p),
        presence_penalty=0.0 if req.presence_penalty is None else float(req.presence_penalty),
        frequency_penalty=0.0 if req.frequency_penalty is None else float(req.frequency_penalty),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        speculative=req.speculative is not False,
    )
    try:
        return params.validate()
    except InvalidRequestError as exc:
        renamed = {"max_tokens": req.max_tokens_param}
        if isinstance(req, ChatCompletionRequest):
            renamed["logprobs"] = "top_logprobs"
        param = renamed.get(exc.param or "", exc.param)
        if param == exc.param:
            raise
        raise InvalidRequestError(str(exc).replace(exc.param or "", param or "", 1), param) from exc


__all__ = [
    "CONTENT_PART_SEPARATOR",
    "MAX_MODEL_NAME_CHARS",
    "MAX_STOP_STRINGS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContextLengthExceededError",
    "StreamOptions",
    "parse_request",
    "stop_strings",
    "to_sampling_params",
]
