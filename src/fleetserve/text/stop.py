"""Stop strings over a streamed text: owns finding user stop strings in text that arrives in arbitrary chunks.

The result does not depend on how the text is chunked: the concatenation of everything ``feed`` and ``flush``
return equals the whole text cut at the first occurrence of a stop string, where "first" means the occurrence that
starts earliest (ties between stops starting at the same place go to the shortest, the one that completes first).
A suffix that could still grow into a stop string is held back, so a stop string split across chunks is caught and
never partly emitted.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Cut a text stream at the first stop string.

    ``feed(chunk)`` returns ``(safe_text, stopped)``; once ``stopped`` is True further input is ignored. With
    ``include_stop`` the stop string itself is emitted too (OpenAI leaves it out, the default). ``flush()`` returns
    what was held back when the stream ends. When stop strings overlap (one completes while an earlier-starting one
    is still possible) the held text may itself contain a stop, so check ``stopped`` again after ``flush()``.
    """

    def __init__(self, stops: Iterable[str], include_stop: bool = False) -> None:
        """Match ``stops`` (duplicates are ignored). Empty strings are a caller bug (the API schema rejects them)."""
        unique = list(dict.fromkeys(stops))
        for stop in unique:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stops: tuple[str, ...] = tuple(unique)
        self.include_stop = include_stop
        self._max_len = max((len(s) for s in unique), default=0)
        self._held = ""
        self._stopped = False
        self._flushed = False
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found (by ``feed`` or by ``flush``)."""
        return self._stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self._matched

    @property
    def held(self) -> str:
        """Text received but not yet returned (it could be the start of a stop string)."""
        return self._held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The (start, stop) of the earliest-starting, then shortest, stop string occurrence in ``text``."""
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index >= 0 and (best is None or (index, len(stop)) < best[:2]):
                best = (index, len(stop), stop)
        return None if best is None else (best[0], best[2])

    def _first_pending(self, text: str) -> int:
        """The earliest position whose suffix is a proper prefix of some stop string (``len(text)`` if none)."""
        for start in range(max(0, len(text) - self._max_len + 1), len(text)):
            tail = text[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return start
        return len(text)

    def _stop_at(self, text: str, start: int, stop: str) -> str:
        """Record the match and return the text to emit up to it."""
        self._stopped = True
        self._matched = stop
        self._held = ""
        return text[: start + len(stop)] if self.include_stop else text[:start]

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next chunk; return the text now safe to emit and whether a stop string was found."""
        if self._stopped:
            return "", True
        if self._flushed:
            raise RuntimeError("StopStringMatcher.feed() called after flush()")
        if not self.stops:
            return text, False
        buffer = self._held + text
        match = self._first_match(buffer)
        pending = self._first_pending(buffer)
        if match is not None and match[0] <= pending:
            return self._stop_at(buffer, *match), True
        self._held = buffer[pending:]
        return buffer[:pending], False

    def flush(self) -> str:
        """End the stream and return the held-back text (cut at a stop string it may contain; see ``stopped``)."""
        if self._stopped or self._flushed:
            return ""
        self._flushed = True
        buffer, self._held = self._held, ""
        match = self._first_match(buffer)
        if match is not None:
            return self._stop_at(buffer, *match)
        return buffer
