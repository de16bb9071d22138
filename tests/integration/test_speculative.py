"""Speculative decoding (n-gram drafts) on the real model: the same tokens as plain decoding, greedy and seeded,
with drafts kept on a prompt that asks for a copy; the per-request opt-out; stops inside an accepted run."""

import dataclasses

import pytest

from fleetserve.contract import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=24)
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door."


@pytest.fixture(scope="module")
def prompts(tokenizer, chat_prompts):
    """A prompt whose answer copies its own text, then two ordinary chat prompts."""
    copy = tokenizer.encode_chat([{"role": "user", "content": f"Repeat this text exactly: {TEXT}"}])
    return [copy, chat_prompts[0], chat_prompts[5]]


@pytest.fixture(scope="module")
def plain(engine, prompts):
    """Greedy outputs without speculation (the shared engine has it off)."""
    return engine.generate(prompts, GREEDY)


@pytest.fixture(scope="module")
def spec(make_engine):
    return make_engine(speculative_tokens=4)


def drafts(engine) -> tuple[int, int]:
    s = engine.stats()
    return s.spec_draft_tokens, s.spec_accepted_tokens


def test_greedy_output_is_plain_decoding(spec, prompts, plain):
    assert spec.generate(prompts[:1], GREEDY) == plain[:1]
    proposed, accepted = drafts(spec)
    assert proposed > 0 and accepted > 0  # the copy is where drafts pay
    assert spec.generate(prompts[1:], GREEDY) == plain[1:]
    assert spec.stats().kv_blocks_used == 0


def test_seeded_sampling_with_penalties_and_logprobs_is_plain_sampling(spec, engine, prompts):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, repetition_penalty=1.1, logprobs=2)

    def run(eng):
        rid = eng.add_request(prompts[0], params)
        tokens, logprobs = [], []
        while eng.has_unfinished():
            for out in eng.step():
                if out.request_id == rid:
                    tokens += out.new_token_ids
                    logprobs += out.logprobs or []
        return tokens, logprobs

    before = drafts(spec)
    tokens, logprobs = run(spec)
    assert drafts(spec)[0] > before[0]
    assert run(spec)[0] == tokens  # reproducible
    plain_tokens, plain_logprobs = run(engine)
    assert tokens == plain_tokens  # and the very tokens plain sampling draws with this seed
    assert [lp.token_id for lp in logprobs] == tokens
    for got, want in zip(logprobs, plain_logprobs, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_opted_out_request_proposes_nothing(spec, prompts, plain):
    before = drafts(spec)
    out = spec.generate(prompts[:1], dataclasses.replace(GREEDY, max_tokens=6, speculative=False))
    assert out == [plain[0][:6]]
    assert drafts(spec) == before


def test_stops_inside_an_accepted_run(spec, prompts, plain):
    expected = plain[0]
    # a token that first appears late in the copied text: its stop cuts the step's accepted run
    index = next(i for i in range(10, len(expected)) if expected[i] not in expected[:i])
    stop = dataclasses.replace(GREEDY, stop_token_ids=[expected[index]])
    spec.add_request(prompts[0], stop)
    tokens, finish = [], None
    while spec.has_unfinished():
        for out in spec.step():
            tokens += out.new_token_ids
            finish = out.finish_reason
    assert tokens == expected[: index + 1] and finish == "stop"
    assert spec.generate(prompts[:1], dataclasses.replace(GREEDY, max_tokens=9)) == [expected[:9]]
    assert spec.stats().kv_blocks_used == 0
