"""SamplingParams: how a request picks each token and when it stops, validated where it enters the fleet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetserve.errors import InvalidRequestError

UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
"""The largest values the wire's fields hold (uint32 counts and token ids, int32 top_k, float32 floats)."""


def _float32(value: float) -> bool:
    """Whether ``value`` is a finite number a float32 field holds."""
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


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
    speculative: bool = True
    """Let the engine verify draft tokens guessed from the context (speculative decoding, when the engine has it
    on). Greedy and seeded requests produce the same tokens either way, others the same distribution; False only
    opts this request out of the extra compute."""

    def validate(self) -> SamplingParams:
        """Raise InvalidRequestError naming the first parameter out of range; return self. Every value checked
        here fits its protobuf field (``protocol/fleet.proto``)."""

        def bad(param: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {rule}, got {getattr(self, param)!r}", param)

        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= UINT32_MAX:
            raise bad("max_tokens", f"must be an integer in 1..{UINT32_MAX}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be an integer in 0..max_tokens ({self.max_tokens})")
        if not _float32(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= INT32_MAX:
            raise bad("top_k", f"must be -1, 0 (no limit) or a positive integer up to {INT32_MAX}")
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
        if any(not isinstance(t, int) or not 0 <= t <= UINT32_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be integers in 0..{UINT32_MAX}")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be true or false")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
