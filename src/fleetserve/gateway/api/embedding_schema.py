"""The /v1/embeddings request body: ``input`` in each of OpenAI's forms, normalised to a list of strings or a list of
token-id lists, ``encoding_format`` and ``dimensions``. Parsed strictly, like the generation bodies (``schema``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from fleetserve.gateway.api.schema import _UINT32, MAX_MODEL_NAME_CHARS, _FieldError, _Model

MAX_INPUTS = 2048
"""The most inputs one request may carry (OpenAI's limit)."""


def _normalize_input(value: Any) -> Any:
    """A string, a list of strings, a list of token ids or a list of lists of token ids -> a non-empty list of
    strings or a non-empty list of token-id lists."""
    if isinstance(value, str):
        if not value:
            raise _FieldError("input must not be an empty string")
        value = [value]
    if not isinstance(value, list):
        raise _FieldError("input must be a string, a list of strings, or token ids")
    if not value:
        raise _FieldError("input must not be an empty list")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]  # one input given as token ids
    if len(value) > MAX_INPUTS:
        raise _FieldError(f"at most {MAX_INPUTS} inputs per request, got {len(value)}")
    texts = all(isinstance(v, str) for v in value)
    for i, item in enumerate(value):
        if texts:
            if not item:
                raise _FieldError("input strings must not be empty", f"[{i}]")
            continue
        if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            raise _FieldError("inputs must be all strings or all lists of token ids", f"[{i}]")
        if not item:
            raise _FieldError("token id lists must not be empty", f"[{i}]")
        bad = next((t for t in item if not 0 <= t < _UINT32), None)
        if bad is not None:
            raise _FieldError(f"token ids must be >= 0 and < 2**32, got {bad}", f"[{i}]")
    return value


class EmbeddingRequest(_Model):
    """A /v1/embeddings body; ``input`` is normalised to a list of strings or a list of token-id lists."""

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    input: list[str] | list[list[int]]
    encoding_format: str | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        """See ``_normalize_input``."""
        return _normalize_input(value)

    @field_validator("encoding_format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value not in (None, "float", "base64"):
            raise _FieldError(f"encoding_format must be 'float' or 'base64', got {value!r}")
        return value

    @property
    def texts(self) -> bool:
        return bool(self.input) and isinstance(self.input[0], str)
