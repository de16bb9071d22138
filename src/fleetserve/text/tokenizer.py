"""The Tokenizer facade: owns encoding, decoding, chat-template rendering and stop ids for the gateway and CLI.

It wraps a ``tokenizers.Tokenizer`` (a Hugging Face fast tokenizer) plus the model's jinja chat template, rendered
the way ``transformers`` renders it, without importing ``transformers``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from fleetserve.errors import InvalidRequestError, UnknownModelError, UnsupportedModelError

# transformers writes this number when a tokenizer has no known maximum length.
_NO_MAX_LENGTH = int(1e29)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_content(value: Any) -> str | None:
    """Normalise a special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _eos_ids(value: Any) -> list[int]:
    """Normalise an ``eos_token_id`` entry (int, list of ints, or null) to a list."""
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing file reads as ``{}``."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path} does not hold a JSON object")
    return data


def _pick_template(value: Any) -> str | None:
    """Return the default chat template from a tokenizer_config ``chat_template`` entry (a string or named list)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        return next(iter(named.values()), None)
    return None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    """The ``tojson`` filter chat templates expect (no HTML escaping, unlike jinja's built-in)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """Template global: lets a chat template reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """Template global: the current local time formatted with ``fmt``."""
    return datetime.now().strftime(fmt)


LONG_TEXT_CHARS = 16 * 1024
"""Texts longer than this are encoded through the tokenizers library's batch call, which releases the GIL, so a
thread tokenizing a huge prompt does not hold up the process's other threads (its event loop among them)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)
"""Everything ``Tokenizer.from_dir`` reads: the files a worker sends a gateway, and the only names a gateway
accepts."""


def tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    """The tokenizer files of a model folder (no weights), by name."""
    return {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILES if (model_dir / name).exists()}


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used to mark assistant text) and render the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        """Parse the block and return its body unchanged."""
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured like transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def validate_messages(messages: Any) -> None:
    """Check ``messages`` is a non-empty list of dicts with a string ``role`` and a string ``content``.

    Raises InvalidRequestError naming the offending field.
    """
    if not isinstance(messages, list):
        raise InvalidRequestError("messages must be a list of {'role', 'content'} objects", param="messages")
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string", param=f"messages[{i}].role")
        if "content" not in message:
            raise InvalidRequestError(f"messages[{i}] has no 'content'", param=f"messages[{i}].content")
        if not isinstance(message["content"], str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")


class Tokenizer:
    """A fast tokenizer plus chat template and special-token ids, built from a Hugging Face folder or a GGUF file.

    ``encode`` never adds BOS/EOS unless asked (``add_special_tokens=True`` runs the tokenizer's post-processor);
    ``decode`` is the ``tokenizers`` decode (no extra space clean-up).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        """Wrap ``backend``; ``eos_token_ids`` are extra stop ids (from generation_config.json or the GGUF).
        Padding and truncation a tokenizer.json may carry are turned off: ids are exact, and length limits are the
        caller's to check (with an error, not a silent cut)."""
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._chat_template = chat_template
        self._compiled: jinja2.Template | None = None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.add_bos_token = bool(add_bos_token)
        self.model_max_length = model_max_length
        self._bos_id = self._id_of(bos_token)
        self._pad_id = self._id_of(pad_token)
        self._unk_id = self._id_of(unk_token)
        extra = [int(i) for i in eos_token_ids]
        primary = self._id_of(eos_token)
        self._eos_id = primary if primary is not None else (extra[0] if extra else None)
        stops = set(extra)
        if self._eos_id is not None:
            stops.add(self._eos_id)
        self._stop_ids = frozenset(stops)
        self._fingerprint: str | None = None
        self._special_ids: frozenset[int] | None = None
        self._byte_ids: frozenset[int] | None = None

    def _id_of(self, token: str | None) -> int | None:
        """The id of a token string, or None."""
        return None if token is None else self._backend.token_to_id(token)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face-style folder: tokenizer.json (required), tokenizer_config.json, chat_template.jinja,
        generation_config.json and config.json (their ``eos_token_id``, an int or a list, become stop ids)."""
        folder = Path(path)
        if not folder.is_dir():
            raise UnknownModelError(f"tokenizer folder {str(folder)!r} does not exist")
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise UnsupportedModelError(f"{str(folder)!r} has no tokenizer.json (only fast tokenizers are supported)")
        backend = HFTokenizer.from_file(str(tok_file))
        config = _read_json(folder / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif template is None:
            template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))
        eos_ids = _eos_ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
        eos_ids += [i for i in _eos_ids(_read_json(folder / "config.json").get("eos_token_id")) if i not in eos_ids]
        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or max_len >= _NO_MAX_LENGTH:
            max_len = None
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            unk_token=_token_content(config.get("unk_token")),
            eos_token_ids=eos_ids,
            add_bos_token=bool(config.get("add_bos_token", False)),
            model_max_length=max_len,
        )

    @classmethod
    def from_gguf(cls, source: str | Path | Any) -> Tokenizer:
        """Build from a GGUF file path or an open ``gguf.GGUFReader`` (no files written)."""
        import gguf

        from fleetserve.text.gguf_tokenizer import build_tokenizer

        reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(str(source))
        backend, config = build_tokenizer(reader)
        return cls(
            backend,
            chat_template=config.get("chat_template"),
            bos_token=config.get("bos_token"),
            eos_token=config.get("eos_token"),
            pad_token=config.get("pad_token"),
            unk_token=config.get("unk_token"),
            eos_token_ids=config.get("extra_eos_token_ids", ()),
            add_bos_token=bool(config.get("add_bos_token", False)),
            model_max_length=config.get("model_max_length"),
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (and generation_config.json when there are several stop
        ids) so that ``Tokenizer.from_dir(path)`` gives back an equal tokenizer (same fingerprint)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        others = sorted(self._stop_ids - {self._eos_id})
        if others:
            gen_path = folder / "generation_config.json"
            gen = _read_json(gen_path)
            gen["eos_token_id"] = ([self._eos_id] if self._eos_id is not None else []) + others
            gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ ids <-> text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (e.g. ``<|im_start|>``) map to their ids."""
        if not isinstance(text, str):
            raise InvalidRequestError("text to encode must be a string", param="prompt")
        if len(text) > LONG_TEXT_CHARS:  # the batch call lets go of the GIL while it works; the plain one does not
            batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # _fast: no offsets
            return batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_inputs(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, the post-processor's special tokens included (an encoder's ``[CLS] ... [SEP]``);
        one batch call, which releases the GIL while it works."""
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("inputs to encode must be strings", param="input")
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # _fast: no offsets
        return [e.ids for e in batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special_tokens``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Vocabulary strings of ``ids`` (None for an unknown id); a single int gives a single string."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens: the ones ``decode(skip_special_tokens=True)`` drops."""
        if self._special_ids is None:
            decoder = self._backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, tok in decoder.items() if tok.special)
        return self._special_ids

    @property
    def byte_fallback_token_ids(self) -> frozenset[int]:
        """Ids of ``<0xNN>`` byte tokens when the decoder joins runs of them (SentencePiece byte fallback), else empty.

        A run of such tokens is decoded as a group, so its text can change until a non-byte token closes it.
        """
        if self._byte_ids is None:
            decoder = self._backend.decoder
            ids: frozenset[int] = frozenset()
            if decoder is not None and b"ByteFallback" in decoder.__getstate__():
                vocab = self._backend.get_vocab(with_added_tokens=False)
                ids = frozenset(i for tok, i in vocab.items() if _BYTE_TOKEN.fullmatch(tok))
            self._byte_ids = ids
        return self._byte_ids

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str | None:
        """The jinja chat template source, or None when the model has none."""
        return self._chat_template

    def _template(self) -> jinja2.Template:
        """The compiled chat template (compiled once)."""
        if self._chat_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead", param="messages")
        if self._compiled is None:
            try:
                self._compiled = _compile_template(self._chat_template)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise UnsupportedModelError(f"the model's chat template does not compile: {exc}") from exc
        return self._compiled

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` with the chat template, as ``transformers`` does with ``tokenize=False``.

        ``extra`` becomes template variables (e.g. ``tools``, ``documents``, ``enable_thinking``); ``bos_token``,
        ``eos_token``, ``pad_token`` and ``unk_token`` are set from the tokenizer unless given there.
        Raises InvalidRequestError for malformed messages, a model without a template, or a template that rejects
        the conversation (``raise_exception``).
        """
        validate_messages(messages)
        template = self._template()
        variables: dict[str, Any] = {
            "tools": None,
            "documents": None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        variables.update(extra)
        variables["messages"] = messages
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**variables)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the conversation: {exc}", param="messages") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Token ids of the rendered chat; no BOS/EOS is added beyond what the template writes."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def eos_token_id(self) -> int | None:
        """The main end-of-sequence id (tokenizer_config's eos_token, else the first configured eos id)."""
        return self._eos_id

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return self._bos_id

    @property
    def pad_token_id(self) -> int | None:
        """The padding id, or None."""
        return self._pad_id

    @property
    def unk_token_id(self) -> int | None:
        """The unknown-token id, or None."""
        return self._unk_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the EOS plus extra eos ids from generation_config/config or the GGUF."""
        return self._stop_ids

    @property
    def fingerprint(self) -> str:
        """sha256 hex over the canonical tokenizer.json, the chat template and the stop ids.

        Two workers with equal fingerprints tokenize, render chats and stop identically. The canonical (compact)
        tokenizer.json serialisation is hashed, so pretty-printing the file does not change it.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(self._backend.to_str().encode("utf-8"))
            digest.update(b"\0chat_template\0")
            digest.update((self._chat_template or "").encode("utf-8"))
            digest.update(b"\0stop_token_ids\0")
            digest.update(",".join(str(i) for i in sorted(self._stop_ids)).encode("ascii"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def __len__(self) -> int:
        """Same as ``vocab_size``."""
        return self.vocab_size

    def __repr__(self) -> str:
        """Short description for logs."""
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, stop_ids={sorted(self._stop_ids)}, "
            f"chat_template={'yes' if self._chat_template else 'no'})"
        )
