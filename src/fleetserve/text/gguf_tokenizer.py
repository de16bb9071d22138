"""GGUF to Hugging Face tokenizer conversion: owns turning a GGUF file's tokenizer metadata into tokenizer files.

Only the ``tokenizers`` library is used (no ``transformers``). Supported GGUF tokenizer models:

* ``gpt2``: byte-level BPE (SmolLM, Llama 3, Qwen 2, StarCoder, ...), built from ``tokenizer.ggml.tokens`` and
  ``tokenizer.ggml.merges``; ``tokenizer.ggml.pre`` picks the pre-tokenizer split rule.
* ``llama``: SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, TinyLlama, ...), with merges rebuilt
  from ``tokenizer.ggml.scores``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from fleetserve.errors import UnsupportedModelError

# GGUF token types (llama.cpp's ``llama_token_type``).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# Split rules named by ``tokenizer.ggml.pre``. Unknown names fall back to the GPT-2 rule (what ByteLevel does).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizers that isolate every digit before applying the GPT-2 rule.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"})
_QWEN2_PRE = frozenset({"qwen2"})

_SPM_SPACE = "\u2581"  # SentencePiece's "lower one eighth block" word marker


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """Return the decoded value of metadata ``key``, or ``default`` when the file does not have it."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _string_array(reader: gguf.GGUFReader, key: str) -> list[str]:
    """Read a GGUF string array, tolerating entries that are not valid UTF-8 (replaced, not dropped)."""
    field = reader.fields.get(key)
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _token_text(tokens: Sequence[str], token_id: int | None) -> str | None:
    """Return the text of ``token_id`` or None when the id is missing or out of range."""
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return tokens[int(token_id)]


def _unique_vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Map token text to id. A repeated text keeps its first id; later copies get an unreachable placeholder name."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            tok = f"<|fleetserve_duplicate_token_{i}|>"
        vocab[tok] = i
    return vocab


def _parse_merges(merges: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Turn GGUF ``"left right"`` merge strings into pairs, checking both halves are tokens."""
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or left not in vocab or right not in vocab:
            # A token may itself contain a space (rare): find the split whose halves are both tokens.
            for pos in range(1, len(merge) - 1):
                if merge[pos] == " " and merge[:pos] in vocab and merge[pos + 1 :] in vocab:
                    left, right = merge[:pos], merge[pos + 1 :]
                    break
            else:
                raise UnsupportedModelError(f"GGUF tokenizer merge {merge!r} does not split into two known tokens")
        pairs.append((left, right))
    return pairs


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Pick the byte-level pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` name."""
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _QWEN2_PRE:
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _spm_merges(
    tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int], types: Sequence[int]
) -> list[tuple[str, str]]:
    """Rebuild BPE merges for a SentencePiece BPE vocabulary: a pair merges with the priority of its result's score."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok_id, tok in enumerate(tokens):
        if types[tok_id] not in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED) or len(tok) < 2:
            continue
        for pos in range(1, len(tok)):
            left, right = tok[:pos], tok[pos:]
            left_id, right_id = vocab.get(left), vocab.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-float(scores[tok_id]), left_id, right_id, left, right))
    ranked.sort(key=lambda item: item[:3])
    return [(left, right) for _, _, _, left, right in ranked]


def _post_processor(
    add_bos: bool, add_eos: bool, bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> processors.PostProcessor | None:
    """Build a post-processor that adds BOS/EOS when ``add_special_tokens=True`` and the GGUF asks for them."""
    pieces_single: list[str] = []
    pieces_pair: list[str] = []
    special: list[tuple[str, int]] = []
    use_bos = add_bos and bos is not None and bos_id is not None
    use_eos = add_eos and eos is not None and eos_id is not None
    if not (use_bos or use_eos):
        return None
    if use_bos:
        pieces_single.append(f"{bos}:0")
        pieces_pair.append(f"{bos}:0")
        special.append((bos, int(bos_id)))
    pieces_single.append("$A:0")
    pieces_pair.append("$A:0")
    if use_eos:
        pieces_single.append(f"{eos}:0")
        pieces_pair.append(f"{eos}:0")
        if (eos, int(eos_id)) not in special:
            special.append((eos, int(eos_id)))
    if use_bos:
        pieces_pair.append(f"{bos}:1")
    pieces_pair.append("$B:1")
    if use_eos:
        pieces_pair.append(f"{eos}:1")
    return processors.TemplateProcessing(
        single=" ".join(pieces_single), pair=" ".join(pieces_pair), special_tokens=special
    )


@dataclass(frozen=True)
class _SpecialTokens:
    """The GGUF's BOS/EOS/UNK/PAD tokens (id and text, None when absent) and whether BOS/EOS are added."""

    bos_id: int | None
    eos_id: int | None
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None
    add_bos: bool
    add_eos: bool


def _tokenizer_model(reader: gguf.GGUFReader) -> str:
    """The GGUF's ``tokenizer.ggml.model``; raise UnsupportedModelError when it is missing or not supported."""
    model_name = _field(reader, "tokenizer.ggml.model")
    if model_name is None:
        raise UnsupportedModelError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if model_name not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model_name!r} is not supported (supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)})"
        )
    return model_name


def _tokens_and_types(reader: gguf.GGUFReader) -> tuple[list[str], list[int]]:
    """The token texts and their GGUF token types (all normal when the file gives none), checked to match."""
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError("GGUF file has an empty tokenizer.ggml.tokens list")
    types = list(_field(reader, "tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise UnsupportedModelError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    return tokens, types


def _special_tokens(reader: gguf.GGUFReader, names: Sequence[str], model_name: str) -> _SpecialTokens:
    """The special tokens named by the metadata, as texts of ``names`` (token text by id)."""
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    return _SpecialTokens(
        bos_id=bos_id,
        eos_id=eos_id,
        bos=_token_text(names, bos_id),
        eos=_token_text(names, eos_id),
        unk=_token_text(names, _field(reader, "tokenizer.ggml.unknown_token_id")),
        pad=_token_text(names, _field(reader, "tokenizer.ggml.padding_token_id")),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", model_name == "llama")),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    )


def _byte_level_bpe(reader: gguf.GGUFReader, vocab: dict[str, int]) -> HFTokenizer:
    """The ``gpt2`` model: byte-level BPE from the GGUF merges, split by the rule ``tokenizer.ggml.pre`` names."""
    merges = _parse_merges(_string_array(reader, "tokenizer.ggml.merges"), vocab)
    pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
    tokenizer = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _LLAMA3_PRE)
    )
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    reader: gguf.GGUFReader, names: Sequence[str], vocab: dict[str, int], types: Sequence[int], unk: str | None
) -> HFTokenizer:
    """The ``llama`` model: SentencePiece BPE with byte fallback, its merges rebuilt from the token scores."""
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(types):
        raise UnsupportedModelError("GGUF 'llama' tokenizer needs tokenizer.ggml.scores for every token")
    merges = _spm_merges(names, scores, vocab, types)
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", _SPM_SPACE)
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace]) if add_space_prefix else replace
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_typed_tokens(tokenizer: HFTokenizer, names: Sequence[str], types: Sequence[int]) -> None:
    """Register control and unknown tokens as special tokens, user-defined ones as added (non-special) tokens."""
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(names, types, strict=True)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind in zip(names, types, strict=True)
        if kind == TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)


def _tokenizer_config(reader: gguf.GGUFReader, names: Sequence[str], specials: _SpecialTokens) -> dict[str, Any]:
    """The tokenizer_config dict: special tokens, chat template, context length, and the extra end-of-turn ids."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "unk_token": specials.unk,
        "add_bos_token": specials.add_bos,
        "add_eos_token": specials.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = str(template)
    arch = _field(reader, "general.architecture")
    context_length = _field(reader, f"{arch}.context_length") if arch else None
    if context_length is not None:
        config["model_max_length"] = int(context_length)
    config["extra_eos_token_ids"] = _extra_eos_ids(reader, names, specials.eos_id)
    return config


def _extra_eos_ids(reader: gguf.GGUFReader, names: Sequence[str], eos_id: int | None) -> list[int]:
    """The end-of-turn and end-of-message ids that are tokens and differ from the EOS, sorted."""
    extra_eos = []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and _token_text(names, value) is not None and int(value) != eos_id:
            extra_eos.append(int(value))
    return sorted(set(extra_eos))


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[HFTokenizer, dict[str, Any]]:
    """Build the ``tokenizers`` tokenizer and the tokenizer_config dict described by a GGUF file's metadata.

    Returns ``(tokenizer, config)``; ``config`` has the keys written to ``tokenizer_config.json`` plus
    ``"extra_eos_token_ids"`` (end-of-turn / end-of-message ids other than the EOS, possibly empty).
    Raises UnsupportedModelError for tokenizer models other than ``gpt2`` and ``llama``.
    """
    model_name = _tokenizer_model(reader)
    tokens, types = _tokens_and_types(reader)
    vocab = _unique_vocab(tokens)
    names = list(vocab)  # token text by id (a repeated text renamed), as the tokenizer will know it
    specials = _special_tokens(reader, names, model_name)
    if model_name == "gpt2":
        tokenizer = _byte_level_bpe(reader, vocab)
    else:
        tokenizer = _sentencepiece_bpe(reader, names, vocab, types, specials.unk)
    _add_typed_tokens(tokenizer, names, types)
    post = _post_processor(
        specials.add_bos, specials.add_eos, specials.bos, specials.bos_id, specials.eos, specials.eos_id
    )
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer, _tokenizer_config(reader, names, specials)


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF file behind ``reader`` into ``out_dir``.

    When the GGUF names end-of-turn/end-of-message tokens besides the EOS, their ids are also merged into
    ``generation_config.json`` (``eos_token_id`` as a list), the place Hugging Face keeps extra stop ids.
    Raises UnsupportedModelError for GGUF tokenizer models other than ``gpt2`` and ``llama``.
    """
    tokenizer, config = build_tokenizer(reader)
    extra_eos = config.pop("extra_eos_token_ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if extra_eos:
        gen_path = out / "generation_config.json"
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
        eos_id = tokenizer.token_to_id(config["eos_token"]) if config.get("eos_token") else None
        gen["eos_token_id"] = ([eos_id] if eos_id is not None else []) + extra_eos
        gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
