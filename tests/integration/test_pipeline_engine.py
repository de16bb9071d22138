"""The engine as a pipeline's head, in one process: stages on the real model, a link that runs them in turn.

The link here carries tensors by their bytes (as the gRPC link does) and delivers results in order; the gRPC
transport between processes is tested in test_pipeline.py.
"""

from collections import deque

import pytest
import torch

from fleetserve.contract import SamplingParams, StageHop, StageResult
from fleetserve.engine.pipeline import StageExecutor, sampling_rows, tensor_bytes, tensor_from_bytes
from fleetserve.errors import EngineStepError, InvalidRequestError, StageLinkError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
KV = 16 * 2**20


class LocalLink:
    """Later stages in this process: ``send`` runs them at once, ``receive`` hands back results in order."""

    def __init__(self, stages: list[StageExecutor], break_after: int | None = None):
        self.stages = stages
        self.results: deque[StageResult] = deque()
        self.sent = 0
        self.break_after = break_after
        self.closed = False

    def send(self, step, seqs, hidden):
        if self.break_after is not None and self.sent >= self.break_after:
            raise StageLinkError("the next stage went away")
        self.sent += 1
        hops = []
        for i, stage in enumerate(self.stages):
            data, shape, dtype = tensor_bytes(hidden)
            hidden = stage.run(seqs, tensor_from_bytes(data, shape, dtype, 576))
            hops.append(StageHop(f"s{i + 1}", 0, 0, 0.001, 0.0, len(data)))
        self.results.append(StageResult(step, sampling_rows(seqs, hidden), hops))

    def receive(self, timeout):
        return self.results.popleft() if self.results else None

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def prompts(chat_prompts):
    return chat_prompts + [p[:6] + [28, 314] + p[6:] for p in chat_prompts]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    return engine.generate(prompts, GREEDY)


def build_pipeline(make_engine, cuts, depth=2, **options):
    """A head engine on [0, cuts[0]) and stage executors for the ranges after it, joined by a LocalLink."""
    from fleetserve.engine.model_runner import ModelRunner
    from tests.helpers import engine_config

    head = make_engine(layer_end=cuts[0], lm_head=True, kv_cache_bytes=KV * cuts[0] // 30, **options)
    stages = []
    bounds = [*cuts, 30]
    for start, end in zip(bounds, bounds[1:]):
        config = engine_config(layer_start=start, layer_end=end, lm_head=False, kv_cache_bytes=KV * (end - start) // 30)
        stages.append(StageExecutor(ModelRunner(config.validate(), head.model_dir, head.arch)))
    assert {s.num_blocks for s in stages} == {head.runner.num_blocks}
    link = LocalLink(stages)
    head.attach_link(link, depth)
    return head, link


@pytest.mark.parametrize("cuts", [[13], [8, 19]])
def test_pipeline_greedy_equals_one_engine(make_engine, prompts, alone, cuts):
    head, _ = build_pipeline(make_engine, cuts, depth=len(cuts) + 1)
    assert head.generate(prompts, GREEDY) == alone
    stats = head.stats()
    assert stats.kv_blocks_used == 0 and stats.extra["pipeline_steps"] > 0


def test_pipeline_chunked_prefill_prefix_hits_and_seeds(make_engine, engine, prompts, alone):
    head, _ = build_pipeline(make_engine, [15], depth=2, budget=24, max_seqs=16)
    assert head.generate(prompts[:8], GREEDY) == alone[:8]  # prompts arrive in chunks of at most 24 tokens
    assert head.generate(prompts[:4], GREEDY) == alone[:4]  # again: their prefixes are cached now
    assert head.stats().prefix_cache_hits > 0
    seeded = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7 + i) for i in range(4)]
    assert head.generate(prompts[:4], seeded) == engine.generate(prompts[:4], seeded)


def test_link_break_keeps_requests_and_a_new_link_finishes_them_exactly(make_engine, prompts, alone):
    head, link = build_pipeline(make_engine, [10], depth=2)
    link.break_after = 6
    ids = [head.add_request(p, GREEDY) for p in prompts]
    got = {i: [] for i in ids}
    for _ in range(200):
        for out in head.step():
            got[out.request_id] += out.new_token_ids
        if head.pipeline.link is None:
            break
    assert link.closed and head.pipeline.broken_reason == "the next stage went away"
    assert head.stats().kv_blocks_used == 0 and head.scheduler.num_waiting == len(prompts)
    assert head.step() == []  # nothing runs without a chain
    # A new plan: the head now runs [0, 12); one stage the rest.
    from fleetserve.engine.model_runner import ModelRunner
    from tests.helpers import engine_config

    head.reconfigure(12, head.runner.kv_bytes_per_token // 10 * 12 * 16 * 30)  # 30 blocks for 12 layers
    assert head.runner.num_blocks == 30 and head.runner.model.layer_end == 12
    config = engine_config(layer_start=12, layer_end=30, lm_head=False, kv_cache_bytes=KV)
    stage = StageExecutor(ModelRunner(config.validate(), head.model_dir, head.arch))
    head.attach_link(LocalLink([stage]), 2)
    while head.has_unfinished():
        for out in head.step():
            got[out.request_id] += out.new_token_ids
    assert [got[i] for i in ids] == alone


def test_bad_hidden_states_fail_that_step_only(make_engine, prompts):
    with pytest.raises(InvalidRequestError, match="need 8 bytes"):
        tensor_from_bytes(b"\0" * 7, [2, 1], "float32")
    with pytest.raises(InvalidRequestError, match="expected \\[tokens, 576\\]"):
        tensor_from_bytes(b"\0" * 8, [1, 2], "float32", 576)
    head, link = build_pipeline(make_engine, [15], depth=1)
    stage = link.stages[0]
    with pytest.raises(InvalidRequestError, match="hidden rows"):
        stage.run([], torch.zeros(3, 576))
    rid = head.add_request(prompts[0], GREEDY)
    original = link.send

    def wrong_shape(step, seqs, hidden):
        original(step, seqs, hidden)
        link.results[-1].hidden = torch.zeros(1, 7)

    link.send = wrong_shape
    with pytest.raises(EngineStepError, match="shape \\(1, 7\\)") as err:
        for _ in range(10):
            head.step()
    assert err.value.request_ids == [rid]
    link.send = original
    assert head.stats().kv_blocks_used == 0
    assert head.generate(prompts[:1], SamplingParams(max_tokens=3, ignore_eos=True))[0]
