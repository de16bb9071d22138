"""KV that outlives its request, on the real model: a prefill's KV continued by another engine (token-exact,
also from that engine's own prefix cache), pinned sessions with their TTL and bounds, and what expires."""

import pytest

from fleetserve.config import RetentionConfig
from fleetserve.contract import SamplingParams
from fleetserve.errors import InvalidRequestError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(engine) -> dict[str, list]:
    """Step until idle; every request's outputs."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def prefill_then_decode(prefill, decode, prompt, params, start: int = 0):
    """The first token on ``prefill``, the rest on ``decode`` from the KV exported from ``start`` on."""
    rid = prefill.add_request(prompt, params, prefill_only=True)
    (out,) = run(prefill)[rid]
    assert out.finish_reason == "prefilled" and len(out.new_token_ids) == 1
    transfer = prefill.export_kv(rid, start)
    prefill.release(rid)
    assert prefill.stats().kv_blocks_used == 0 and not prefill.pinned()
    assert (transfer.start, transfer.num_tokens) == (start, len(prompt) - start)
    did = decode.add_request(prompt, params, kv_import=transfer, resumed_output=out.new_token_ids)
    rest = run(decode)[did]
    return out.new_token_ids + tokens(rest), transfer, rest


@pytest.fixture(scope="module")
def pair(make_engine):
    return make_engine(), make_engine()


def test_a_prefill_continued_elsewhere_gives_the_same_text(pair, engine, chat_prompts):
    prefill, decode = pair
    for params in (GREEDY, SEEDED):
        for prompt in chat_prompts[:2]:
            alone = engine.generate([prompt], params)[0]
            got, _, rest = prefill_then_decode(prefill, decode, prompt, params)
            assert got == alone
    assert decode.stats().kv_blocks_used == 0


def test_only_what_the_decode_cache_lacks_is_exported(pair, engine, tokenizer):
    prefill, decode = pair
    system = "You are a careful assistant who answers briefly and precisely. " * 8
    first = tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "A color?"}])
    prompt = tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": "A fruit?"}])
    decode.generate([first], SamplingParams(max_tokens=2))  # the decode engine now caches the system prompt
    cached = decode.cached_prefix_tokens(prompt)
    assert cached >= 64 and cached % 16 == 0
    got, transfer, rest = prefill_then_decode(prefill, decode, prompt, GREEDY, start=cached)
    assert got == engine.generate([prompt], GREEDY)[0]
    arch = prefill.arch
    assert len(transfer.data) == transfer.num_tokens * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 4
    assert rest[0].num_cached_tokens == cached


def test_a_prefill_that_ends_on_its_first_token_keeps_nothing(pair, chat_prompts):
    prefill, _ = pair
    rid = prefill.add_request(chat_prompts[0], SamplingParams(max_tokens=1), prefill_only=True)
    (out,) = run(prefill)[rid]
    assert out.finish_reason == "length"
    assert prefill.stats().kv_blocks_used == 0 and not prefill.pinned()


def test_an_unfetched_prefill_expires(make_engine, chat_prompts):
    prefill = make_engine(retention=RetentionConfig(transfer_ttl_s=5))
    clock = prefill.pins.clock = Clock()
    rid = prefill.add_request(chat_prompts[1], GREEDY, prefill_only=True)
    run(prefill)
    assert [p.key for p in prefill.pinned()] == [rid] and prefill.stats().kv_blocks_used > 0
    clock.now += 6
    assert not prefill.pinned() and prefill.stats().kv_blocks_used == 0


def test_bad_imports_are_refused_and_change_nothing(pair, chat_prompts):
    prefill, decode = pair
    rid = prefill.add_request(chat_prompts[2], GREEDY, prefill_only=True)
    (out,) = run(prefill)[rid]
    transfer = prefill.export_kv(rid)
    prefill.release(rid)
    with pytest.raises(InvalidRequestError, match="bytes"):
        decode.add_request(chat_prompts[2], GREEDY, kv_import=type(transfer)(**{**transfer.__dict__, "data": b"x"}))
    with pytest.raises(InvalidRequestError, match="no KV"):
        prefill.export_kv("nothing-here", 0)
    with pytest.raises(InvalidRequestError, match="other tokens"):
        decode.add_request(chat_prompts[3], GREEDY, kv_import=transfer, resumed_output=out.new_token_ids)
    assert decode.stats().kv_blocks_used == 0 and not decode.has_unfinished()


def _turn(engine, prompt, session, max_tokens=16):
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), session_id=session)
    outs = run(engine)[rid]
    return tokens(outs), outs[-1]


def test_a_sessions_next_turn_prefills_only_its_new_tokens(make_engine, tokenizer):
    eng = make_engine(kv_cache_bytes=20 * 2**20)
    clock = eng.pins.clock = Clock()
    history = [{"role": "user", "content": "Tell me about the history of tea in a few sentences. " * 12}]
    first = tokenizer.encode_chat(history)
    answer, out = _turn(eng, first, "conv-1")
    assert out.num_cached_tokens == 0
    pinned = eng.pinned()
    assert [(p.kind, p.key) for p in pinned] == [("session", "conv-1")] and pinned[0].tokens >= len(first)
    for k in range(16):  # other traffic churns the free blocks; the pinned ones stay
        eng.generate([[1000 + 61 * k + i for i in range(60)]], SamplingParams(max_tokens=2))
    second = first + answer + tokenizer.encode("\nAnd coffee?")
    _, out = _turn(eng, second, "conv-1")
    assert out.num_cached_tokens >= len(first) // 16 * 16
    assert len(eng.pinned()) == 1 and eng.pinned()[0].tokens > len(second) - 1  # the new turn replaced the pin
    clock.now += 601
    assert not eng.pinned() and eng.stats().kv_blocks_used == 0


def test_session_limits(make_engine, chat_prompts):
    eng = make_engine(
        kv_cache_bytes=32 * 2**20,
        retention=RetentionConfig(max_sessions=3, max_session_tokens=200, session_cache_share=0.5),
    )
    with pytest.raises(InvalidRequestError, match="at most 200"):
        eng.add_request(list(range(10, 190)), SamplingParams(max_tokens=32), session_id="big")
    assert eng.stats().kv_blocks_used == 0
    for i in range(5):
        eng.pins.clock = lambda i=i: 1000.0 + i
        _turn(eng, chat_prompts[i], f"s{i}")
    assert sorted(p.key for p in eng.pinned()) == ["s2", "s3", "s4"]  # the longest idle went first
    assert eng.release_session("s3") and not eng.release_session("s3")
    assert sorted(p.key for p in eng.pinned()) == ["s2", "s4"]


def test_a_flood_of_sessions_leaves_running_requests_alone(make_engine, engine, chat_prompts):
    eng = make_engine(kv_cache_bytes=24 * 2**20, retention=RetentionConfig(session_cache_share=0.3))
    blocks = eng.kv.num_blocks
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = engine.generate([chat_prompts[7]], long)[0]
    rid = eng.add_request(chat_prompts[7], long)
    got, floods = [], 0
    while eng.has_unfinished():
        if floods < 20 and eng.scheduler.num_waiting == 0:
            eng.add_request(
                list(range(100 + floods, 180 + floods)), SamplingParams(max_tokens=4), session_id=f"f{floods}"
            )
            floods += 1
        for o in eng.step():
            if o.request_id == rid:
                got += o.new_token_ids
        assert eng.pins.session_blocks() <= int(0.3 * blocks)
    assert got == expected and eng.stats().num_preemptions == 0
    assert eng.pins.released_over_limit > 0


def test_the_transfer_does_not_depend_on_the_block_size(pair, engine, chat_prompts, make_engine):
    prefill, _ = pair
    wide = make_engine(block_size=32)  # the decode side pages its cache in blocks of 32 tokens, the prefill in 16
    got, transfer, _ = prefill_then_decode(prefill, wide, chat_prompts[5], GREEDY)
    assert got == engine.generate([chat_prompts[5]], GREEDY)[0]
    assert wide.stats().kv_blocks_used == 0
