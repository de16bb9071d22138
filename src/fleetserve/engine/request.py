"""Request, SamplingParams and RequestOutput: the engine's data, with validation of user input."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch

from fleetserve.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Defaults mean greedy, 16 tokens."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 means no top-k cut."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no log-probabilities; n >= 0: the sampled token's, plus the n most likely alternatives."""

    def validate(self) -> SamplingParams:
        """Raise InvalidRequestError naming the first parameter out of range; return self."""

        def bad(param: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {rule}, got {getattr(self, param)!r}", param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be an integer in 0..max_tokens ({self.max_tokens})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (no limit) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 10 or not math.isfinite(self.repetition_penalty):
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in 0..20")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class RequestStatus(enum.IntEnum):
    """Lifecycle, ordered: every status above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass
class TokenLogprob:
    """Log-probability of one sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability) pairs, most likely first."""


@dataclass
class KVTransfer:
    """KV cache contents of a sequence's first ``num_tokens`` tokens, as bytes.

    ``data`` holds a tensor of shape [num_layers, num_tokens, 2, num_kv_heads, head_dim] (2 = key, value)
    in ``dtype``, contiguous, in token order, so engines with other block sizes can import it.
    """

    token_ids: list[int]
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    data: bytes


@dataclass
class Request:
    """One sequence inside the engine. Tokens = prompt + output; KV exists for the first num_computed_tokens."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    """Smaller runs first; equal priorities run in arrival order."""
    retain_kv: bool = False
    """Keep the KV blocks after finishing, until the engine is told to release them (for export)."""
    kv_import: KVTransfer | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first scheduling."""
    num_preemptions: int = 0
    first_token_time: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival_seq: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    num_output_tokens: int
    """Tokens generated so far, these included."""
    num_prompt_tokens: int
    num_cached_tokens: int
    finish_reason: str | None
    """None while running; then "stop", "length" or "abort"."""
    logprobs: list[TokenLogprob] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
