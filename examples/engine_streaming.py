"""Stream three chat answers at once from an AsyncEngine: python examples/engine_streaming.py"""

import asyncio

from fleetserve.contract import SamplingParams
from fleetserve.engine.async_engine import AsyncEngine
from fleetserve.text.detokenizer import IncrementalDetokenizer
from fleetserve.text.tokenizer import Tokenizer

QUESTIONS = ["Why is the sky blue?", "Name three planets.", "What is a haiku?"]


async def answer(engine: AsyncEngine, tok: Tokenizer, i: int, question: str) -> str:
    ids = tok.encode_chat([{"role": "user", "content": question}])
    detok = IncrementalDetokenizer(tok, ids)
    text = ""
    async for out in engine.generate(ids, SamplingParams(max_tokens=48)):
        piece = detok.add(out.new_token_ids)
        text += piece
        print(f"[{i}] {piece!r}")
    return text + detok.flush()


async def main() -> None:
    engine = await AsyncEngine.create()
    tok = Tokenizer.from_dir(engine.engine.model_dir)
    answers = await asyncio.gather(*(answer(engine, tok, i, q) for i, q in enumerate(QUESTIONS)))
    await engine.close()
    for q, a in zip(QUESTIONS, answers):
        print(f"\n{q}\n{a}")


if __name__ == "__main__":
    asyncio.run(main())
