"""The engine's settings, shared by every command that runs one (generate, worker, up's workers)."""

from __future__ import annotations

from pydantic import model_validator

from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fleetserve.settings.base import Settings, option

MiB = 2**20


class EngineSettings(Settings):
    """Which model an engine loads and how it batches and caches."""

    model: str = option("smollm2-135m-instruct", "model name, Hugging Face folder or .gguf file")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    dtype: str = option(
        "auto",
        "weights: auto, float32, bfloat16, float16 or int4 (a Q4 GGUF's own 4-bit codes, CPU); auto picks the "
        "fastest that is as faithful as the checkpoint: int4 for a Q4 GGUF where it measures faster, bfloat16 on "
        "CUDA, else float32 (the form that equals transformers)",
    )
    compile: bool = option(
        True,
        "run decode-only steps through compiled graphs, one per padded batch size, built in the background while "
        "eager steps serve (inductor cache under the model cache); --no-compile keeps every step eager",
    )
    kv_cache_mb: int = option(512, "memory for KV blocks in MiB")
    block_size: int = option(16, "tokens per KV block")
    prefix_caching: bool = option(True, "reuse cached prompt prefixes")
    max_num_seqs: int = option(64, "most sequences running at once")
    max_num_batched_tokens: int | None = option(
        None, "token budget of one engine step (default: 128 on CPU, or --max-num-seqs if more; 512 on CUDA)"
    )
    speculative_tokens: int = option(
        0,
        "draft tokens a decode verifies per step, guessed by n-gram lookup in its own context (speculative "
        "decoding; 0: off). Pays where the output repeats the prompt (edits, quotes); costs on ordinary chat",
    )
    speculative_ngram: int = option(3, "longest n-gram matched to find draft tokens (tried down to 1)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    max_model_len: int | None = option(None, "context window in tokens (default: the model's own)")
    small_step_threads: int | None = option(
        None,
        "torch threads for steps of at most 4 rows, the decodes of a few sequences (default: --threads)",
    )

    def engine_config(self) -> EngineConfig:
        """The engine's own typed config (validated)."""
        return EngineConfig(
            model=ModelConfig(
                model=self.model,
                device=self.device,
                dtype=self.dtype,
                num_threads=self.threads,
                small_step_threads=self.small_step_threads,
                compile=self.compile,
                max_model_len=self.max_model_len,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                kv_cache_bytes=self.kv_cache_mb * MiB,
                enable_prefix_caching=self.prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                speculative_tokens=self.speculative_tokens,
                speculative_ngram=self.speculative_ngram,
            ),
        ).validate()

    @model_validator(mode="after")
    def _valid_engine(self) -> EngineSettings:
        self.engine_config()  # InvalidRequestError names the bad value
        return self
