"""AsyncEngine: concurrent streams, errors before the first output, cancellation freeing blocks at once,
per-request sinks, and outputs gathered to a stream interval."""

import asyncio

import pytest

from fleetserve.contract import SamplingParams
from fleetserve.engine.async_engine import AsyncEngine, EngineDeadError, default_stream_interval
from fleetserve.errors import InvalidRequestError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_engine(make_engine):
    """One engine for the module; each test wraps it in its own AsyncEngine and closes that."""
    engine = make_engine()
    yield engine
    assert not engine.has_unfinished()


async def collect(aengine, prompt, params, **kw):
    tokens, outs = [], []
    async for out in aengine.generate(prompt, params, **kw):
        tokens += out.new_token_ids
        outs.append(out)
    return tokens, outs


def test_concurrent_streams_equal_offline_results(base_engine, chat_prompts):
    engine = base_engine
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = engine.generate(chat_prompts[:4], params)

    async def main():
        aengine = AsyncEngine(engine)
        try:
            results = await asyncio.gather(*(collect(aengine, p, params) for p in chat_prompts[:4]))
        finally:
            await aengine.close()
        return results

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    for _, outs in results:
        assert [o.num_output_tokens for o in outs] == list(range(1, 13))
        assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
        assert outs[0].first_token_time >= outs[0].arrival_time


def test_bad_request_raises_and_does_not_disturb_others(base_engine, chat_prompts):
    engine = base_engine

    async def main():
        aengine = AsyncEngine(engine)
        good = asyncio.create_task(collect(aengine, chat_prompts[0], SamplingParams(max_tokens=8, ignore_eos=True)))
        with pytest.raises(InvalidRequestError):
            await collect(aengine, [], SamplingParams())
        with pytest.raises(InvalidRequestError):
            await collect(aengine, chat_prompts[1], SamplingParams(top_p=7.0))
        tokens, _ = await good
        await aengine.close()
        return tokens

    assert len(asyncio.run(main())) == 8


def test_cancelling_a_stream_aborts_and_frees_blocks(base_engine, chat_prompts):
    engine = base_engine

    async def main():
        aengine = AsyncEngine(engine)
        got = []

        async def consume():
            async for out in aengine.generate(chat_prompts[0], SamplingParams(max_tokens=500, ignore_eos=True)):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        assert aengine.stats().kv_blocks_used > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await aengine.call(engine.stats)  # runs after the abort command, between two steps
        await aengine.close()
        return got, stats

    got, stats = asyncio.run(main())
    assert len(got) < 500
    assert stats.running == 0 and stats.kv_blocks_used == 0


def test_sinks_take_each_steps_outputs_and_a_failing_one_disturbs_no_other(base_engine, chat_prompts):
    engine = base_engine
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = engine.generate(chat_prompts[:2], params)

    async def main():
        aengine = AsyncEngine(engine)
        got: dict[str, list] = {"good": [], "bad": []}
        done = asyncio.get_running_loop().create_future()

        def good(out):
            got["good"].append(out)
            if out.finished:
                done.set_result(None)

        def bad(out):
            got["bad"].append(out)
            raise RuntimeError("this listener is broken")

        await aengine.start(chat_prompts[0], params, sink=good)
        bad_id = await aengine.start(chat_prompts[1], SamplingParams(max_tokens=500, ignore_eos=True), sink=bad)
        await done
        aengine.drop(bad_id, abort=True)  # its listener stops listening: the engine aborts it
        stats = await aengine.call(engine.stats)
        await aengine.close()
        return got, stats

    got, stats = asyncio.run(main())
    assert [t for o in got["good"] for t in o.new_token_ids] == expected[0]
    assert got["good"][-1].finish_reason == "length"
    assert got["bad"] and len(got["bad"]) < 500  # its outputs kept coming, each to its own failing listener
    assert stats.running == 0 and stats.kv_blocks_used == 0


def test_abort_by_id_ends_the_stream(base_engine, chat_prompts):
    engine = base_engine

    async def main():
        aengine = AsyncEngine(engine)
        outs = []

        async def consume():
            async for out in aengine.generate(
                chat_prompts[0], SamplingParams(max_tokens=500, ignore_eos=True), request_id="victim"
            ):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        assert await aengine.abort("victim")
        await task
        await aengine.close()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort"


def test_stream_interval_hands_tokens_in_groups_and_loses_none(base_engine, chat_prompts):
    engine = base_engine
    params = SamplingParams(max_tokens=11, ignore_eos=True, logprobs=1)
    expected = engine.generate(chat_prompts[:3], params)

    async def main():
        aengine = AsyncEngine(engine, stream_interval=4, stream_max_wait_s=60.0)
        try:
            results = await asyncio.gather(*(collect(aengine, p, params) for p in chat_prompts[:3]))
            victim: list = []

            async def consume():
                long = SamplingParams(max_tokens=500, ignore_eos=True)
                async for out in aengine.generate(chat_prompts[0], long, request_id="victim"):
                    victim.append(out)

            task = asyncio.create_task(consume())
            while len(victim) < 2:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.03)  # a step or two past a group: tokens are held when the abort comes
            assert await aengine.abort("victim")
            await task
        finally:
            await aengine.close()
        return results, victim

    results, victim = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    for _, outs in results:
        # the first token at once, then groups of four, the last group whatever is left when it finishes
        assert [len(o.new_token_ids) for o in outs] == [1, 4, 4, 2]
        assert [o.num_output_tokens for o in outs] == [1, 5, 9, 11]
        assert all(len(o.logprobs) == len(o.new_token_ids) for o in outs)
        assert outs[-1].finish_reason == "length" and outs[0].first_token_time == outs[0].time
    # an abort hands on what the request had gathered: every token it made reached the stream
    assert victim[-1].finish_reason == "abort"
    assert sum(len(o.new_token_ids) for o in victim) == victim[-1].num_output_tokens


def test_a_stream_interval_holds_no_token_past_its_longest_wait(base_engine, chat_prompts):
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(base_engine, stream_interval=4, stream_max_wait_s=0.0)
        try:
            return await collect(aengine, chat_prompts[0], params)
        finally:
            await aengine.close()

    tokens, outs = asyncio.run(main())
    assert [len(o.new_token_ids) for o in outs] == [1] * 6  # no wait allowed: every step's token goes at once
    assert tokens == base_engine.generate([chat_prompts[0]], params)[0]


def test_an_engine_left_to_its_device_gathers_four_tokens_on_cpu_and_none_on_cuda(base_engine, chat_prompts):
    assert default_stream_interval("cpu") == 4 and default_stream_interval("cuda") == 1
    interval = default_stream_interval(base_engine.runner.device.type)
    params = SamplingParams(max_tokens=9, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(base_engine, stream_interval=None, stream_max_wait_s=60.0)
        try:
            assert aengine.stream_interval == interval
            return await collect(aengine, chat_prompts[1], params)
        finally:
            await aengine.close()

    tokens, outs = asyncio.run(main())
    assert [len(o.new_token_ids) for o in outs] == [1] + [interval] * (8 // interval)
    assert tokens == base_engine.generate([chat_prompts[1]], params)[0]


def test_closed_engine_refuses_requests(base_engine, chat_prompts):
    engine = base_engine

    async def main():
        aengine = AsyncEngine(engine)
        await aengine.close()
        assert not aengine.alive
        with pytest.raises(EngineDeadError):
            await collect(aengine, chat_prompts[0], SamplingParams(max_tokens=2))

    asyncio.run(main())
