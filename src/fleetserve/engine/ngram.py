"""Draft tokens without a draft model: n-gram lookup in a sequence's own context (prompt lookup decoding).

Text that repeats itself (code being edited, a quoted passage, a list that follows a pattern) is predicted by what
followed the same few tokens earlier in the context. The proposer finds the most recent earlier occurrence of the
sequence's last n tokens (the longest n up to ``max_ngram`` that occurs) and proposes the tokens that came after
it. The engine verifies a proposal in one forward pass (``Sampler.verify``), so a wrong guess costs compute, never
correctness.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramProposer:
    """Proposes up to ``num_tokens`` draft tokens by matching the context's last ``max_ngram`` .. 1 tokens."""

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3):
        assert num_tokens > 0 and max_ngram > 0
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram

    def propose(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        """Draft tokens to follow ``tokens`` (at most ``limit``, default ``num_tokens``); [] when nothing matches.

        One backward pass over the context: at each earlier occurrence of the last token, count how many of the
        tokens before it match as well (up to ``max_ngram``); the most recent occurrence of the longest match wins.
        """
        limit = self.num_tokens if limit is None else min(limit, self.num_tokens)
        end = len(tokens) - 1  # index of the last token, the suffix's end
        if limit <= 0 or end < 1:
            return []
        last = tokens[end]
        best_len, best_at = 0, -1
        for i in range(end - 1, -1, -1):
            if tokens[i] != last:
                continue
            n = 1
            while n < self.max_ngram and i - n >= 0 and tokens[i - n] == tokens[end - n]:
                n += 1
            if n > best_len:  # ties keep the later (more recent) occurrence, found first
                best_len, best_at = n, i
                if n == self.max_ngram:
                    break
        if best_at < 0:
            return []
        return list(tokens[best_at + 1 : best_at + 1 + limit])
