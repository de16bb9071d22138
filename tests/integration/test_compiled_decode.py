"""Compiled decode steps on the real model's weights: the same hidden states as the eager step, one graph per batch
bucket and no recompile as contexts grow, padding rows that touch no real KV.

The runners hold the model's first two layers (a pipeline head's shape): compiling the whole model takes about a
minute per bucket on a small CPU, two layers a few seconds, and the graph's structure is the same.
"""

import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.engine.compiled_decode import batch_buckets
from fleetserve.engine.model_runner import ModelRunner
from fleetserve.engine.request import Request
from fleetserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from fleetserve.model_files import load_arch
from tests.helpers import engine_config

pytestmark = pytest.mark.slow

BLOCK = 16
MAX_SEQS = 4


def runner(model_dir, compile: bool) -> ModelRunner:
    config = engine_config(
        kv_cache_bytes=8 * 2**20, max_seqs=MAX_SEQS, block_size=BLOCK, layer_end=2, lm_head=True, compile=compile
    )
    return ModelRunner(config.validate(), model_dir, load_arch(model_dir))


@pytest.fixture(scope="module")
def runners(model_dir):
    compiled = runner(model_dir, compile=True)
    assert compiled.compiled is not None
    assert compiled.compiled.wait(timeout=900), "the decode buckets did not compile in 15 minutes"
    return compiled, runner(model_dir, compile=False)


def test_buckets_are_powers_of_two_up_to_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def test_no_compile_leaves_every_step_eager(runners):
    assert runners[1].compiled is None


def test_compiled_steps_equal_eager_ones_without_recompiling(runners):
    compiled, eager = runners
    decode = compiled.compiled
    assert sorted(decode.ready) == [1, 2, 4]
    assert decode.compiles == 3  # one graph per bucket, the warm-up's second (wider) call included
    # Three sequences on blocks of their own, prompts of different lengths; each "decodes" the rest of its
    # prompt one token per step (teacher forcing), so contexts grow across block boundaries.
    prompts = [list(range(1000 + 50 * i, 1000 + 50 * i + n)) for i, n in enumerate((70, 45, 75))]
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    prefill = [5, 17, 31]
    for r in (compiled, eager):
        plan = SchedulerOutput([ScheduledSeq(q, 0, n, t) for q, n, t in zip(requests, prefill, tables, strict=True)])
        r.forward(plan)
    positions = list(prefill)
    steps = 0
    for live in ([0, 1, 2],) * 14 + ([0, 2],) * 12 + ([2],) * 12:  # buckets 4 (one padding row), 2 and 1
        plan = SchedulerOutput([ScheduledSeq(requests[i], positions[i], 1, tables[i]) for i in live])
        got, want = compiled.forward(plan), eager.forward(plan)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
        got_logits, want_logits = compiled.model.compute_logits(got), eager.model.compute_logits(want)
        assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
        for i in live:
            positions[i] += 1
        steps += 1
    assert positions == [31, 31, 69]  # 38 steps; contexts crossed 16-token blocks several times
    assert decode.compiles == 3, "a decode step recompiled as its context grew or its batch shrank"
    # Padding rows wrote only the spare block: the real KV equals the eager runner's.
    for mine, theirs in zip(compiled.kv_caches, eager.kv_caches, strict=True):
        real = compiled.num_blocks * BLOCK
        torch.testing.assert_close(mine[:real], theirs[:real], rtol=1e-3, atol=1e-3)


def test_a_step_of_more_sequences_than_any_bucket_runs_eagerly(runners):
    decode = runners[0].compiled
    assert decode.bucket(MAX_SEQS + 1) is None
    assert decode.run([1] * (MAX_SEQS + 1), [0] * (MAX_SEQS + 1), [[0]] * (MAX_SEQS + 1)) is None
