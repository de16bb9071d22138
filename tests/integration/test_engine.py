"""The engine on the real model: batching, chunked prefill, prefix caching, preemption, seeds, abort, KV transfer,
layer ranges and bad input."""

import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.errors import CapacityError, InvalidRequestError, UnknownModelError, UnsupportedModelError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def sixteen(chat_prompts):
    """16 distinct prompts of different lengths."""
    prompts = chat_prompts + [p[:6] + [28, 314] + p[6:] for p in chat_prompts]  # 8 more with inserted tokens
    assert len({tuple(p) for p in prompts}) == 16
    return prompts


@pytest.fixture(scope="module")
def alone(engine, sixteen):
    """Each prompt's greedy output when it runs by itself."""
    return [engine.generate([p], GREEDY)[0] for p in sixteen]


def test_batch_invariance(engine, sixteen, alone):
    assert engine.generate(sixteen, GREEDY) == alone


def test_batch_invariance_with_small_prefill_chunks(make_engine, sixteen, alone):
    small = make_engine(budget=24, max_seqs=16)  # prompts of ~40 tokens arrive in chunks of at most 24 tokens
    assert small.generate(sixteen, GREEDY) == alone
    assert small.stats().kv_blocks_used == 0


def test_prefix_caching_hits_and_matches_output_without_it(make_engine, engine, chat_prompts):
    system = "You are a meticulous assistant. " * 12
    from fleetserve.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(engine.model_dir)
    a = tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}])
    b = tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}])
    cached = make_engine(prefix_caching=True)
    uncached = make_engine(prefix_caching=False)
    cached.generate([a], GREEDY)
    before = cached.stats().prefix_cache_hits
    rid = cached.add_request(b, GREEDY)
    outs, got = [], []
    while cached.has_unfinished():
        for o in cached.step():
            outs.append(o)
            got += o.new_token_ids
    hits = cached.stats().prefix_cache_hits - before
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert hits == shared // 16 > 0
    assert outs[-1].num_cached_tokens == hits * 16 and outs[-1].request_id == rid
    assert got == uncached.generate([b], GREEDY)[0]
    assert uncached.stats().prefix_cache_hits == 0


def test_preemption_keeps_outputs(make_engine, sixteen, alone):
    # 12 blocks of 16 tokens: two or three sequences of ~64 tokens at a time, so the rest get preempted.
    per_block = 30 * 2 * 3 * 64 * 4 * 16
    tight = make_engine(kv_cache_bytes=12 * per_block, prefix_caching=False)
    assert tight.kv.num_blocks == 12
    assert tight.generate(sixteen[:6], GREEDY) == alone[:6]
    assert tight.stats().num_preemptions > 0
    assert tight.stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible_alone_and_batched(engine, sixteen):
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    a = engine.generate([sixteen[0]], seeded)[0]
    b = engine.generate([sixteen[0]], seeded)[0]
    mates = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * 3
    c = engine.generate([sixteen[3], sixteen[0], sixteen[5], sixteen[7]], [mates[0], seeded, mates[1], mates[2]])[1]
    assert a == b == c
    other = engine.generate([sixteen[0]], SamplingParams(max_tokens=20, temperature=0.9, seed=99, ignore_eos=True))[0]
    assert other != a


def test_abort_frees_every_block(engine, sixteen):
    ids = [engine.add_request(p, SamplingParams(max_tokens=200)) for p in sixteen[:4]]
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    outs = [engine.abort(i) for i in ids]
    assert all(o.finish_reason == "abort" for o in outs)
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    assert engine.abort(ids[0]) is None


def test_kv_export_import_continues_identically(make_engine, engine, sixteen):
    whole = engine.generate([sixteen[2]], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    first = make_engine()
    second = make_engine()
    rid = first.add_request(sixteen[2], SamplingParams(max_tokens=10, ignore_eos=True), retain_kv=True)
    head = []
    while first.has_unfinished():
        for o in first.step():
            head += o.new_token_ids
    transfer = first.export_kv(rid)
    first.release(rid)
    assert first.stats().kv_blocks_used == 0
    assert transfer.num_tokens == len(sixteen[2]) + 9  # the last sampled token has no KV yet
    second.add_request(sixteen[2] + head, SamplingParams(max_tokens=20, ignore_eos=True), kv_import=transfer)
    tail = []
    steps = 0
    while second.has_unfinished():
        steps += 1
        for o in second.step():
            tail += o.new_token_ids
            assert o.num_prompt_tokens == len(sixteen[2]) + 10
    assert head + tail == whole
    assert steps == 20  # no prefill step: the imported KV was used


def test_kv_import_rejects_mismatched_tokens(engine, sixteen):
    rid = engine.add_request(sixteen[1], SamplingParams(max_tokens=2), retain_kv=True)
    while engine.has_unfinished():
        engine.step()
    transfer = engine.export_kv(rid)
    engine.release(rid)
    with pytest.raises(InvalidRequestError, match="other tokens"):
        engine.add_request(sixteen[4], SamplingParams(max_tokens=2), kv_import=transfer)
    assert engine.stats().kv_blocks_used == 0


def test_layer_ranges_back_to_back_equal_whole_model(make_engine, engine, sixteen):
    front = make_engine(layer_start=0, layer_end=13)
    back = make_engine(layer_start=13, layer_end=30)
    assert front.runner.model.num_local_layers == 13 and back.runner.model.num_local_layers == 17
    prompts = sixteen[:3]
    logits = {}
    for name, engines in (("whole", [engine]), ("split", [front, back])):
        for e in engines:
            for i, p in enumerate(prompts):
                e.add_request(p, SamplingParams(max_tokens=1), request_id=f"{name}-{i}")
        plans = [e.scheduler.schedule() for e in engines]
        hidden = None
        for e, plan in zip(engines, plans):
            hidden = e.runner.forward(plan, hidden)
        logits[name], _ = engines[-1].runner.logits(plans[-1], hidden)
        for e in engines:
            for i in range(len(prompts)):
                e.abort(f"{name}-{i}")
    assert logits["whole"].shape == (3, 49152)
    assert torch.allclose(logits["whole"], logits["split"], atol=1e-4, rtol=0)


def test_bad_input_is_refused_and_others_go_on(engine, sixteen):
    good = engine.add_request(sixteen[0], SamplingParams(max_tokens=5, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="context window is 8192"):
        engine.add_request([1] * 8190, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([1, 999999], GREEDY)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request([1, 2], SamplingParams(temperature=-0.5))
    assert err.value.param == "temperature"
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([1, 2], GREEDY, request_id=good)
    out = []
    while engine.has_unfinished():
        out += engine.step()
    assert [o.request_id for o in out] == [good] * 5 and out[-1].finish_reason == "length"


def test_request_larger_than_the_cache_is_refused(make_engine):
    per_block = 30 * 2 * 3 * 64 * 4 * 16
    small = make_engine(kv_cache_bytes=4 * per_block)
    with pytest.raises(CapacityError, match="4"):
        small.add_request([1] * 40, SamplingParams(max_tokens=40))


def test_unknown_and_unsupported_models(tmp_path):
    from fleetserve.engine.engine import LLMEngine

    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        LLMEngine.from_model("no-such-model", progress=False)
    (tmp_path / "config.json").write_text('{"architectures": ["GPTBigCodeForCausalLM"]}')
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        LLMEngine.from_model(str(tmp_path), progress=False)


def test_eos_finishes_with_stop(engine, chat_prompts):
    out = engine.generate([chat_prompts[2]], SamplingParams(max_tokens=200))[0]
    assert out[-1] == 2 and len(out) < 200  # "Paris." and <|im_end|>


def test_logprobs_are_returned_per_token(engine, chat_prompts):
    rid = engine.add_request(chat_prompts[0], SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 3
    for o, lp in zip(outs, lps):
        assert lp.token_id == o.new_token_ids[0]
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert lp.logprob <= 0 and len(lp.top) == 2


def _run(engine, prompt, params, resumed=None):
    rid = engine.add_request(prompt, params, resumed_output=resumed)
    tokens, last = [], None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            tokens += o.new_token_ids
            last = o
    return tokens, last


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=28, ignore_eos=True),
        SamplingParams(max_tokens=28, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True, presence_penalty=0.5),
        SamplingParams(max_tokens=28, temperature=0.8, seed=11, repetition_penalty=1.3, frequency_penalty=0.4),
    ],
    ids=["greedy", "seeded-presence", "seeded-repetition-frequency"],
)
def test_resumed_output_continues_as_the_first_engine_would(engine, sixteen, params):
    whole, _ = _run(engine, sixteen[3], params)
    for k in (1, 9, 17):
        if k >= len(whole):
            continue
        tail, last = _run(engine, sixteen[3], params, resumed=whole[:k])
        assert whole[:k] + tail == whole, f"resumed after {k} tokens"
        assert last.num_output_tokens == len(whole)  # resumed tokens count as output
        assert last.num_prompt_tokens == len(sixteen[3])


def test_resume_refuses_nothing_left_to_generate(engine, sixteen):
    with pytest.raises(InvalidRequestError, match="already generated"):
        engine.add_request(sixteen[0], SamplingParams(max_tokens=4), resumed_output=[5, 6, 7, 8])
    with pytest.raises(InvalidRequestError, match="resumed token ids"):
        engine.add_request(sixteen[0], SamplingParams(max_tokens=8), resumed_output=[-1])
    assert not engine.has_unfinished()
