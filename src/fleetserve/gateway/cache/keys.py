"""Response cache keys: which requests may be cached, and the key that identifies one request's answer.

:func:`cache_key` is the SHA-256 hex digest of a canonical JSON document (sorted keys, no whitespace) holding the
model name, the model version, the prompt's token ids and every parameter that shapes the output (sampling
parameters, stop strings, ``max_tokens``, ...). Keying on token ids rather than on text makes the key independent
of how the prompt was phrased (chat messages or raw text) once it has been templated and tokenized; keying on the
model version makes a redeployed model miss instead of serving stale answers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_FORMAT_VERSION = 1
"""Part of every cache key: bumping it invalidates every stored entry at once."""


def _canonical(value: Any) -> Any:
    """``value`` with integral floats turned into ints, so ``1.0`` and ``1`` give the same key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def cache_key(model: str, model_version: str, prompt_token_ids: list[int], params: dict) -> str:
    """The cache key of one request: a 64-character SHA-256 hex digest, with no prefix.

    The digest covers a canonical JSON document (``sort_keys=True``, compact separators, UTF-8) of the model name,
    the model version, the prompt's token ids and ``params``, plus a format version. ``params`` must hold every
    request field that changes the output and only JSON values (strings, numbers, booleans, None, lists, dicts);
    integral floats are normalised (``1.0`` keys like ``1``). Keys of dicts are sorted at every depth, so the
    order in which parameters were given does not matter. NaN or infinite numbers raise ``ValueError``; values
    JSON cannot encode raise ``TypeError``.
    """
    document = {
        "v": KEY_FORMAT_VERSION,
        "model": str(model),
        "model_version": str(model_version),
        "prompt_token_ids": [int(t) for t in prompt_token_ids],
        "params": _canonical(dict(params)),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_cacheable(temperature: float, seed: int | None) -> bool:
    """Whether a request's output is deterministic, and so may be served from the cache.

    True for greedy decoding (``temperature == 0``) and for any request with a fixed ``seed`` (the engine seeds
    each request's sampler from it, so the same seed replays the same tokens).
    """
    return seed is not None or temperature == 0
