"""Compiled decode steps on the real model's weights: the same hidden states as the eager step, one graph per batch
bucket and no recompile as contexts grow, padding rows that touch no real KV.

The runners hold the model's first layer and its LM head (a pipeline head's shape): compiling the whole model
takes about a minute per bucket on a small CPU, one layer a few seconds, and the graph's structure is the same.
"""

import threading

import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.engine import attention, decode_kernel
from fleetserve.engine.compiled_decode import batch_buckets
from fleetserve.engine.model_runner import ModelRunner
from fleetserve.engine.request import Request
from fleetserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from fleetserve.model_files import load_arch
from fleetserve.model_files.catalog import cache_root
from tests.helpers import engine_config

pytestmark = [pytest.mark.slow, pytest.mark.compiles]

BLOCK = 16
MAX_SEQS = 8


def runner(model_dir, compile: bool) -> ModelRunner:
    """Steps of up to 4 rows on one thread (as a worker on a small machine runs them), larger ones on the rest."""
    config = engine_config(
        kv_cache_bytes=8 * 2**20,
        max_seqs=MAX_SEQS,
        block_size=BLOCK,
        layer_end=1,
        lm_head=True,
        compile=compile,
        small_step_threads=1,
    )
    return ModelRunner(config.validate(), model_dir, load_arch(model_dir))


@pytest.fixture(scope="module")
def runners(model_dir, compile_warmed):
    # Our decode-attention kernel, loaded before the graphs are traced: every bucket attends with it.
    assert decode_kernel.ensure_loaded(cache_root() / "kernels")
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
    assert sorted(decode.ready) == [1, 2, 4, 8]
    assert decode.compiles == 4  # one graph per bucket, the warm-up's second (wider) call included
    assert decode_kernel.ready()  # so every bucket attends with our kernel
    # Five sequences on blocks of their own, prompts of different lengths; each "decodes" the rest of its
    # prompt one token per step (teacher forcing), so contexts grow across block boundaries.
    prompts = [list(range(1000 + 50 * i, 1000 + 50 * i + n)) for i, n in enumerate((80, 45, 90, 30, 40))]
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(5)]
    prefill = [5, 17, 31, 9, 12]
    for r in (compiled, eager):
        plan = SchedulerOutput([ScheduledSeq(q, 0, n, t) for q, n, t in zip(requests, prefill, tables, strict=True)])
        r.forward(plan)
    positions = list(prefill)
    # buckets 8 (three padding rows, two threads), 4 (one padding row, one thread), 2 and 1
    for live in ([0, 1, 2, 3, 4],) * 10 + ([0, 1, 2],) * 14 + ([0, 2],) * 12 + ([2],) * 12:
        plan = SchedulerOutput([ScheduledSeq(requests[i], positions[i], 1, tables[i]) for i in live])
        got, want = compiled.forward(plan), eager.forward(plan)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
        got_logits, want_logits = compiled.model.compute_logits(got), eager.model.compute_logits(want)
        assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
        for i in live:
            positions[i] += 1
    assert positions == [41, 41, 79, 19, 22]  # 48 steps; contexts crossed 16-token blocks several times
    assert decode.compiles == 4, "a decode step recompiled as its context grew or its batch shrank"
    # Padding rows wrote only the spare block: the real KV equals the eager runner's.
    for mine, theirs in zip(compiled.kv_caches, eager.kv_caches, strict=True):
        real = compiled.num_blocks * BLOCK
        torch.testing.assert_close(mine[:real], theirs[:real], rtol=1e-3, atol=1e-3)


def test_a_step_that_would_recompile_runs_eagerly_instead(runners, model_dir):
    compiled = runners[0]
    decode = compiled.compiled
    before = decode.compiles
    result = []
    # A thread count other than bucket 2's fails the graph's check: serving must not compile it again.
    worker = threading.Thread(target=lambda: result.append(_decode_on_three_threads(decode)))
    worker.start()
    worker.join()
    assert result == [None]
    assert 2 not in decode.ready and decode.compiles == before
    plan = SchedulerOutput([ScheduledSeq(Request("x", [5, 6, 7], SamplingParams()), 2, 1, [40])] * 2)
    assert compiled.forward(plan).shape == (2, compiled.arch.hidden_size)  # eagerly


def _decode_on_three_threads(decode):
    torch.set_num_threads(3)
    with torch.inference_mode():
        return decode.run([5, 6], [2, 2], [[40], [41]])


def test_a_step_of_more_sequences_than_any_bucket_runs_eagerly(runners):
    decode = runners[0].compiled
    assert decode.bucket(MAX_SEQS + 1) is None
    assert decode.run([1] * (MAX_SEQS + 1), [0] * (MAX_SEQS + 1), [[0]] * (MAX_SEQS + 1)) is None


def test_a_compiling_runners_mixed_step_attends_its_decodes_with_our_kernel(runners, monkeypatch):
    compiled, eager = runners
    requests = [Request(f"m{i}", list(range(2000 + 40 * i, 2040 + 40 * i)), SamplingParams()) for i in range(3)]
    tables = [list(range(100 + 4 * i, 104 + 4 * i)) for i in range(3)]
    for r in (compiled, eager):  # two sequences' prompts, then a step of their decodes beside the third's prompt
        r.forward(SchedulerOutput([ScheduledSeq(requests[i], 0, 21 + 8 * i, tables[i]) for i in range(2)]))
    mixed = SchedulerOutput(
        [ScheduledSeq(requests[0], 21, 1, tables[0]), ScheduledSeq(requests[1], 29, 1, tables[1])]
        + [ScheduledSeq(requests[2], 0, 18, tables[2])]
    )
    general = []
    gathered = attention._gathered_decode_attention
    monkeypatch.setattr(attention, "_gathered_decode_attention", lambda *a: general.append(1) or gathered(*a))
    got = compiled.forward(mixed)
    assert general == []  # the eager step of a compiling runner: our kernel
    want = eager.forward(mixed)
    assert general == [1]  # --no-compile: the general path, whose rounding float32 parity rests on
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    assert torch.equal(compiled.model.compute_logits(got).argmax(-1), eager.model.compute_logits(want).argmax(-1))
