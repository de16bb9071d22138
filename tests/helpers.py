"""Builders shared by the tests: requests, schedulers and small engines."""

from __future__ import annotations

from fleetserve.config import CacheConfig, EngineConfig, ModelConfig, RetentionConfig, SchedulerConfig
from fleetserve.contract import SamplingParams
from fleetserve.engine.kv_cache import KVCacheManager
from fleetserve.engine.request import Request
from fleetserve.engine.scheduler import Scheduler

EOS = 2

# Eight chat prompts of different lengths and topics, for reference and batching tests.
PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the ocean.",
    "What is the capital of France? Answer in one word.",
    "Explain recursion to a five year old.",
    "List three prime numbers greater than 100.",
    "def fibonacci(n):\n    # complete this Python function",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short tip for sleeping better, and say why it works in two sentences at most.",
]


def make_request(request_id: str, num_prompt: int, max_tokens: int = 8, priority: int = 0, **params) -> Request:
    """A request whose prompt is ``num_prompt`` distinct token ids (derived from the id, so prompts differ)."""
    base = 1000 + 97 * (abs(hash(request_id)) % 100)
    prompt = [base + i for i in range(num_prompt)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params), priority=priority)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_seqs: int = 8,
    prefix_caching: bool = True,
    speculative_tokens: int = 0,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, speculative_tokens=speculative_tokens
    )
    return Scheduler(config, kv, 4096, {EOS})


def engine_config(
    kv_cache_bytes: int = 64 * 2**20,
    budget: int = 512,
    max_seqs: int = 64,
    prefix_caching: bool = True,
    block_size: int = 16,
    retention: RetentionConfig | None = None,
    speculative_tokens: int = 0,
    speculative_ngram: int = 3,
    **model,
) -> EngineConfig:
    """An engine config for tests; float32 weights and eager steps unless ``dtype`` and ``compile`` say
    otherwise (the form that equals transformers, which the reference tests compare with)."""
    model.setdefault("dtype", "float32")
    model.setdefault("compile", False)
    return EngineConfig(
        model=ModelConfig(**model),
        cache=CacheConfig(block_size=block_size, kv_cache_bytes=kv_cache_bytes, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            speculative_tokens=speculative_tokens,
            speculative_ngram=speculative_ngram,
        ),
        retention=retention or RetentionConfig(),
    )
