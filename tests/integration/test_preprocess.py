"""The preprocessing pool: helper processes tokenize exactly as the gateway would inline, errors included."""

import asyncio

import pytest

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.preprocess import PreprocessPool

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
