"""Prompt preprocessing: the helper pool tokenizes exactly as the gateway would inline, errors included, and
survives crashed, stuck and over-talkative helpers; the Preprocessor keeps large prompts off the event loop."""

import asyncio
import contextlib
import os
import signal
import sys
import time

import pytest

from fleetserve.errors import InvalidRequestError, PreprocessError, UnknownModelError
from fleetserve.gateway.preprocess import INLINE_MAX_CHARS, Preprocessor, PreprocessPool
from fleetserve.gateway.tokenizers import TokenizerStore

pytestmark = pytest.mark.slow


def test_pool_matches_inline_tokenization(model_dir, tokenizer):
    chats = [[{"role": "user", "content": f"Question number {i}: why?"}] for i in range(12)]
    texts = ["Hello world", "Ünïcödé and 日本語 😀", "  spaces\tand\nlines  "]

    async def main():
        pool = PreprocessPool(2)
        await pool.start()
        try:
            got_chats = await asyncio.gather(*(pool.encode_chat(model_dir, c) for c in chats))
            got_texts = await asyncio.gather(*(pool.encode(model_dir, t) for t in texts))
            with pytest.raises(InvalidRequestError) as err:
                await pool.encode_chat(model_dir, [{"role": "user"}])
            return got_chats, got_texts, err.value
        finally:
            await pool.close()

    got_chats, got_texts, error = asyncio.run(main())
    assert got_chats == [tokenizer.encode_chat(c) for c in chats]
    assert got_texts == [tokenizer.encode(t) for t in texts]
    assert error.param and "content" in error.param


# -- supervision: crashes, deadlines, oversized replies ---------------------------------------------------------------

FAKE_HELPER = """
import json, sys, time
from fleetserve.gateway.preprocess import answer

tokenizers = {}
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    request = json.loads(line)
    text = request.get("text")
    if text == "sleep forever":
        time.sleep(3600)
    if text == "huge reply":
        out.write(b'{"id": %d, "ids": [' % request["id"] + b"7, " * 400_000 + b'7]}\\n')
    else:
        out.write(answer(request, tokenizers, 2**30))
    out.flush()
"""


@pytest.fixture
def fake_helper(tmp_path) -> list[str]:
    """The command line of a helper that answers as the real one, but sleeps forever on the text "sleep forever"
    and sends a reply of about 3 MB on "huge reply"."""
    script = tmp_path / "fake_helper.py"
    script.write_text(FAKE_HELPER)
    return [sys.executable, str(script)]


async def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


def test_a_killed_helper_is_started_again(model_dir, tokenizer):
    async def main():
        pool = PreprocessPool(2)
        await pool.start()
        try:
            assert await pool.encode(model_dir, "warm up") == tokenizer.encode("warm up")
            victim = pool.pids[0]
            os.kill(victim, signal.SIGKILL)
            with contextlib.suppress(PreprocessError):  # at once: an answer or a clear error, never a hang
                assert await asyncio.wait_for(pool.encode(model_dir, "at once"), 10) == tokenizer.encode("at once")
            await wait_until(lambda: pool.restarts == 1 and None not in pool.pids)
            assert victim not in pool.pids
            texts = [f"after the crash {i}" for i in range(6)]
            got = await asyncio.gather(*(pool.encode(model_dir, t) for t in texts))
            assert got == [tokenizer.encode(t) for t in texts]
        finally:
            await pool.close()

    asyncio.run(main())


def test_calls_on_a_helper_that_dies_fail_at_once(model_dir, fake_helper, tokenizer):
    async def main():
        pool = PreprocessPool(1, argv=fake_helper)
        await pool.start()
        try:
            stuck = asyncio.create_task(pool.encode(model_dir, "sleep forever"))
            behind = asyncio.create_task(pool.encode(model_dir, "queued behind it"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            os.kill(pool.pids[0], signal.SIGKILL)
            for task in (stuck, behind):
                with pytest.raises(PreprocessError, match="exited"):
                    await asyncio.wait_for(task, 10)
            assert time.monotonic() - started < 5
            await wait_until(lambda: pool.pids[0] is not None)
            assert await pool.encode(model_dir, "next one") == tokenizer.encode("next one")
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_call_past_its_deadline_fails_alone(model_dir, fake_helper, tokenizer):
    async def main():
        pool = PreprocessPool(2, argv=fake_helper, call_timeout_s=2.0)
        await pool.start()
        try:
            stuck = asyncio.create_task(pool.encode(model_dir, "sleep forever"))
            await asyncio.sleep(0.2)
            texts = [f"meanwhile {i}" for i in range(8)]
            got = [await pool.encode(model_dir, t) for t in texts]  # the other helper answers them
            assert got == [tokenizer.encode(t) for t in texts]
            with pytest.raises(PreprocessError, match="took longer than 2s"):
                await stuck
            await wait_until(lambda: pool.restarts == 1 and None not in pool.pids)
            got = await asyncio.gather(*(pool.encode(model_dir, t) for t in texts))
            assert got == [tokenizer.encode(t) for t in texts]
        finally:
            await pool.close()

    asyncio.run(main())


def test_an_oversized_reply_fails_its_request_only(model_dir, fake_helper, tokenizer):
    async def main():
        pool = PreprocessPool(1, argv=fake_helper, max_reply_bytes=2**20)
        await pool.start()
        try:
            pid = pool.pids[0]
            texts = ["before", "huge reply", "after", "and after that"]
            results = await asyncio.gather(*(pool.encode(model_dir, t) for t in texts), return_exceptions=True)
            assert isinstance(results[1], InvalidRequestError) and results[1].param == "prompt"
            assert "far too long" in str(results[1])
            for i in (0, 2, 3):
                assert results[i] == tokenizer.encode(texts[i])
            assert pool.pids == [pid] and pool.restarts == 0
        finally:
            await pool.close()

    asyncio.run(main())


def test_the_helper_refuses_a_reply_over_its_cap(model_dir, tokenizer):
    async def main():
        pool = PreprocessPool(1, max_reply_bytes=400)
        await pool.start()
        try:
            with pytest.raises(InvalidRequestError, match="far too long") as err:
                await pool.encode_chat(model_dir, [{"role": "user", "content": "word " * 200}])
            assert err.value.param == "messages"
            assert await pool.encode(model_dir, "short") == tokenizer.encode("short")
        finally:
            await pool.close()

    asyncio.run(main())


# -- the Preprocessor ---------------------------------------------------------------------------------------------------


def test_the_preprocessor_gives_the_same_ids_inline_in_a_thread_and_in_the_pool(tmp_path, model_dir, tokenizer):
    store = TokenizerStore(tmp_path)
    store.tokenizers["m"], store.folders["m"] = tokenizer, model_dir
    small = "Hello <|im_start|> world, ünïcödé 日本語 😀"
    large = "".join(f"Sentence {i}: the quick brown fox jumps over the lazy dog. " for i in range(2000))
    assert len(large) > INLINE_MAX_CHARS
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": large}]

    async def run(pre: Preprocessor):
        return [
            await pre.encode("m", small),
            await pre.encode("m", large),
            await pre.encode_chat("m", [{"role": "user", "content": small}]),
            await pre.encode_chat("m", chat),
        ]

    expected = [
        tokenizer.encode(small),
        tokenizer.encode(large),
        tokenizer.encode_chat([{"role": "user", "content": small}]),
        tokenizer.encode_chat(chat),
    ]

    async def main():
        assert await run(Preprocessor(store)) == expected
        assert await run(Preprocessor(store, inline_max_chars=0)) == expected  # everything in a thread
        with pytest.raises(InvalidRequestError):
            await Preprocessor(store, inline_max_chars=0).encode_chat("m", [{"role": "user"}])
        with pytest.raises(UnknownModelError):
            await Preprocessor(store).encode("other", "x")
        pool = PreprocessPool(1)
        await pool.start()
        try:
            assert await run(Preprocessor(store, pool)) == expected
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_large_prompt_leaves_the_event_loop_free(tmp_path, model_dir, tokenizer):
    store = TokenizerStore(tmp_path)
    store.tokenizers["m"], store.folders["m"] = tokenizer, model_dir
    text = "".join(f"Line {i}: a fairly ordinary sentence with words in it. " for i in range(40_000))  # ~2 MiB

    async def main():
        gaps = []
        done = asyncio.Event()

        async def tick():
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        ids = await Preprocessor(store).encode("m", text)
        took = time.monotonic() - started
        done.set()
        await ticker
        return ids, took, max(gaps)

    ids, took, worst_gap = asyncio.run(main())
    assert ids == tokenizer.encode(text)
    assert worst_gap < max(0.5, took / 4), f"the loop stalled {worst_gap:.2f}s of a {took:.2f}s tokenization"
