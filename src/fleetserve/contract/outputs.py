"""What an engine reports: per-step request outputs, token log-probabilities and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fleetserve.contract.stage import StageHop


@dataclass
class TokenLogprob:
    """Log-probability of one sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability) pairs, most likely first."""


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
    prefill_hops: list[StageHop] | None = None
    """On a pipeline head's first output of the request: each stage's part in computing its prompt (summed over
    the prompt's chunks)."""
    decode_hops: list[StageHop] | None = None
    """On a pipeline head's last output: each stage's part in the decode steps, summed over ``decode_steps``."""
    decode_steps: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """This output and a later one of the same request as one output: the tokens (and log-probabilities) of
        both, this one's prompt's hops if the later has none, and the later one's counts, times and state."""
        logprobs = later.logprobs
        if self.logprobs is not None:
            logprobs = self.logprobs + (later.logprobs or [])
        return replace(
            later,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            logprobs=logprobs,
            prefill_hops=later.prefill_hops or self.prefill_hops,
        )


@dataclass
class EngineStats:
    """Load and cache figures, for logs, heartbeats and benchmarks."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_cached: int
    kv_cache_bytes: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    steps: int
    spec_draft_tokens: int = 0
    """Draft tokens proposed and verified (speculative decoding)."""
    spec_accepted_tokens: int = 0
    """Draft tokens that verification kept; acceptance rate = accepted / draft."""
    decode_graphs_ready: int = 0
    """Compiled decode steps built (one per padded batch size)."""
    decode_graphs_pending: int = 0
    """Compiled decode steps still being built in the background (0 when compiling is off or done)."""
    extra: dict = field(default_factory=dict)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
