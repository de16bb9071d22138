"""Streaming detokenization: owns turning generated token ids into text chunks as they arrive.

Technique: only a short window of recent ids is decoded each step. ``_prefix`` marks where the window starts and
``_read`` the last *safe point* (a position where the decoded text ended on a complete character). The window holds
the ids since the safe point before last, so decoders that look at neighbouring tokens (SentencePiece's leading-space
strip, WordPiece's ``##``) see the same context they would see in a full decode. Text is returned up to, but not
including, a trailing run of U+FFFD, which may still turn into a character when the next bytes arrive. With
SentencePiece byte fallback a run of ``<0xNN>`` tokens is decoded as one group (an invalid byte turns the whole run
into U+FFFD), so nothing is returned while the stream ends in such a run.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.text.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Drop ids before the window once this many have piled up (keeps memory flat on long generations).
_TRIM_AT = 512


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text, returning only the new text on each ``add``.

    Guarantees: ``"".join(all add() results) + flush() == tokenizer.decode(all_generated_ids, skip_special_tokens)``;
    a returned chunk never ends inside a multi-byte character (a U+FFFD is only returned once it can no longer
    change, or by ``flush``). Each step decodes a few recent ids, not the whole sequence.

    ``prompt_ids`` is recorded (``prompt_ids`` attribute) but does not change the text: the contract is the decode of
    the generated ids alone, and using the prompt as decoding context would break it for tokenizers that strip the
    first leading space (SentencePiece) or prompts ending mid-character.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        """Start an empty stream for ``tokenizer``."""
        self._tokenizer = tokenizer
        self.prompt_ids: list[int] = [int(i) for i in prompt_ids] if prompt_ids is not None else []
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # ids from some point before the window to now
        self._prefix = 0  # window start (index into _ids)
        self._read = 0  # last safe point (index into _ids)
        self._sent = 0  # chars of decode(_ids[_prefix:]) already returned
        self._num_tokens = 0
        self._parts: list[str] = []
        self._finished = False
        self._byte_ids = tokenizer.byte_fallback_token_ids
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._in_byte_run = False  # the last (not skipped) id is a byte-fallback token

    def _decode(self, ids: list[int]) -> str:
        """Decode with this stream's special-token setting."""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append generated ids and return the text they complete ("" when nothing new is safe to show yet)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() called after flush()")
        if not new_ids:
            return ""
        start = len(self._ids)
        self._ids.extend(int(i) for i in new_ids)
        self._num_tokens += len(new_ids)
        if self._byte_ids:
            for token_id in self._ids[start:]:
                if token_id in self._byte_ids:
                    self._in_byte_run = True
                elif token_id not in self._skipped_ids:
                    self._in_byte_run = False
            if self._in_byte_run:
                return ""  # the run's bytes are decoded as one group: nothing in it is final yet
        text = self._decode(self._ids[self._prefix :])
        stable = len(text.rstrip(_REPLACEMENT))
        out = text[self._sent : stable] if stable > self._sent else ""
        self._sent = max(self._sent, stable)
        if stable == len(text):
            self._mark_safe_point(text)
        if out:
            self._parts.append(out)
        return out

    def _mark_safe_point(self, text: str) -> None:
        """The window text ``text`` ends on a complete character: record the end of ``_ids`` as a safe point.

        The window then restarts at the previous safe point, provided the ids since then decode to some text on
        their own (so they give the next tokens their real left context); otherwise the window keeps its start.
        """
        end = len(self._ids)
        since_last = self._decode(self._ids[self._read : end])
        if since_last:
            self._prefix, self._read = self._read, end
            self._sent = len(since_last)
        else:
            self._read = end
            self._sent = len(text)
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def flush(self) -> str:
        """End the stream and return any held-back text (e.g. U+FFFD of a character that never completed)."""
        if self._finished:
            return ""
        self._finished = True
        out = self._decode(self._ids[self._prefix :])[self._sent :]
        if out:
            self._parts.append(out)
        return out

    @property
    def skip_special_tokens(self) -> bool:
        """Whether special tokens are left out of the text (fixed for the stream's life)."""
        return self._skip

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._parts)

    @property
    def num_tokens(self) -> int:
        """How many generated ids were added."""
        return self._num_tokens

    @property
    def finished(self) -> bool:
        """Whether ``flush()`` was called."""
        return self._finished
