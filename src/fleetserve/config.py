"""The engine's typed config, one class per concern, composed into EngineConfig and validated once.

Processes build it from their settings (fleetserve.settings); the engine takes nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.errors import InvalidRequestError

MiB = 1024 * 1024

CPU_TOKEN_BUDGET = 128
"""Default token budget of a CPU engine's step (``SchedulerConfig.token_budget``)."""


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 512 * MiB
    """Memory given to KV blocks (all layers this engine runs); sets the number of blocks."""
    enable_prefix_caching: bool = True
    """Keep freed full blocks keyed by a hash of their prefix so later requests skip that prefill."""

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise InvalidRequestError(f"block_size must be in 1..1024, got {self.block_size}", "block_size")
        if self.kv_cache_bytes <= 0:
            raise InvalidRequestError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}", "kv_cache_bytes")


@dataclass
class SchedulerConfig:
    """Continuous batching: what one engine step may hold."""

    max_num_batched_tokens: int | None = None
    """Token budget of one step: decode tokens first, prefill chunks with the rest. None: ``token_budget``'s
    default for the engine's device."""
    max_num_seqs: int = 64
    """Most sequences running at once."""
    speculative_tokens: int = 0
    """Draft tokens a decode may verify in one step (n-gram lookup in the sequence's own context); 0: off. Off by
    default: on CPU a step verifying 4 drafts costs about twice a plain decode, which pays on text that repeats
    its context but not on ordinary chat (docs/engine.md, "Speculative decoding")."""
    speculative_ngram: int = 3
    """Longest n-gram matched to find a draft (tried from this down to 1)."""

    def token_budget(self, device_type: str) -> int:
        """The step budget on a device of this type: the one set, else the default. On CPU a step's time grows in
        proportion to its rows from a few dozen on, so steps of 128 tokens prefill as fast as steps of 512 and a
        burst of prompts gets its first tokens in turn rather than all after one long step; never fewer tokens
        than sequences, so that every running sequence can decode in one step. On CUDA: 512, the default before
        (a GPU's step time grows far more slowly with its rows)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 512 if device_type == "cuda" else max(CPU_TOKEN_BUDGET, self.max_num_seqs)

    def validate(self) -> None:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1", "max_num_batched_tokens")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be >= 1", "max_num_seqs")
        if not 0 <= self.speculative_tokens <= 16:
            raise InvalidRequestError(
                f"speculative_tokens must be in 0..16 (0 turns speculation off), got {self.speculative_tokens}",
                "speculative_tokens",
            )
        if not 1 <= self.speculative_ngram <= 16:
            raise InvalidRequestError(
                f"speculative_ngram must be in 1..16, got {self.speculative_ngram}", "speculative_ngram"
            )


@dataclass
class ModelConfig:
    """Which model to load, where, and how."""

    model: str = "smollm2-135m-instruct"
    """A known model name, a Hugging Face folder (config.json + safetensors), or a .gguf file."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda[:N]."""
    dtype: str = "auto"
    """auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16 or float16."""
    layer_start: int = 0
    """First decoder layer this engine runs (pipeline stages run a range)."""
    layer_end: int | None = None
    """One past the last decoder layer this engine runs; None means the last layer."""
    lm_head: bool | None = None
    """Hold the final norm and LM head (and sample); None: when the range ends at the last layer. A pipeline's head
    stage runs the first layers and the LM head; its last stage returns hidden states instead."""
    max_model_len: int | None = None
    """Context window in tokens; None takes the model's own."""
    num_threads: int | None = None
    """torch CPU threads for this engine; None leaves torch's default."""
    small_step_threads: int | None = None
    """torch CPU threads for steps of at most SMALL_STEP_ROWS rows (decodes of a few sequences); None: as many as
    the other steps. A worker whose threads take every core gives these steps one fewer, so that its own token
    streaming (and a gateway on the same machine) never waits for a core that a torch thread holds."""
    compile: bool = True
    """Run decode-only steps through compiled graphs (one per padded batch size, built in the background while
    eager steps serve). Off: every step eager, which rounds exactly like prefill (float32 parity, exact resume)."""

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "int4"):
            raise InvalidRequestError(
                f"dtype must be auto, float32, bfloat16, float16 or int4, got {self.dtype!r}", "dtype"
            )
        if self.small_step_threads is not None and self.small_step_threads < 1:
            raise InvalidRequestError(
                f"small_step_threads must be at least 1, got {self.small_step_threads}", "small_step_threads"
            )
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidRequestError(f"device must be auto, cpu or cuda[:N], got {self.device!r}", "device")
        if self.layer_start < 0 or (self.layer_end is not None and self.layer_end <= self.layer_start):
            raise InvalidRequestError(
                f"layer range [{self.layer_start}, {self.layer_end}) is empty or negative", "layer_start"
            )


@dataclass
class RetentionConfig:
    """KV kept after a request finishes: conversation sessions, and prefills waiting for a decode worker."""

    session_ttl_s: float = 600.0
    """How long an idle session's KV stays pinned (a request may ask for less)."""
    max_sessions: int = 256
    """Sessions pinned at once; past it the longest idle is released."""
    max_session_tokens: int = 4096
    """Most tokens one session may hold (prompt plus output of its latest turn); a longer turn is refused."""
    session_cache_share: float = 0.5
    """Share of the KV blocks pinned sessions may hold together; past it the longest idle are released."""
    transfer_ttl_s: float = 30.0
    """How long a prefill's KV waits for its decode worker to fetch it."""

    def validate(self) -> None:
        if self.session_ttl_s <= 0 or self.transfer_ttl_s <= 0:
            raise InvalidRequestError("session_ttl_s and transfer_ttl_s must be positive", "session_ttl_s")
        if self.max_sessions < 0 or self.max_session_tokens < 1:
            raise InvalidRequestError("max_sessions must be >= 0 and max_session_tokens >= 1", "max_sessions")
        if not 0.0 <= self.session_cache_share <= 1.0:
            raise InvalidRequestError(
                f"session_cache_share must be in [0, 1], got {self.session_cache_share}", "session_cache_share"
            )


@dataclass
class EngineConfig:
    """Everything one engine needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    seed: int = 0
    """Seed of the generator used by requests that bring none."""

    def validate(self) -> EngineConfig:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.retention.validate()
        return self
