"""Request traces and their statistics: what each benchmark request did, and the summary row of a finished run."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) of ``values`` by linear interpolation between closest ranks.

    This is numpy's default ("linear") method: sort, place q on the scale 0..n-1, and interpolate between the two
    neighbouring values. One value is every percentile of itself; no values give None.
    """
    if not 0 <= q <= 100 or math.isnan(q):
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in qs}


@dataclass
class RequestTrace:
    """What one request did, in time.monotonic() seconds."""

    request_id: str
    prompt_tokens: int
    arrival: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    """Time of each output that carried tokens."""
    output_tokens: int = 0
    finish_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.finish_reason in ("stop", "length")


@dataclass
class StreamTrace(RequestTrace):
    """A RequestTrace (times in ``time.perf_counter`` seconds) plus what the server said about the prompt."""

    cached_tokens: int = 0
    status: int | None = None
    """The HTTP status (None for gRPC or when no response came)."""

    def fail(self, message: str) -> None:
        """Mark the request failed with ``message`` (kept short)."""
        self.error = message[:300]
        self.finish_reason = "error"
        if self.finish_time is None:
            self.finish_time = time.perf_counter()


def summarize(traces: Sequence[RequestTrace], wall_s: float) -> dict[str, Any]:
    """Counts, throughput and latency percentiles of a finished run (seconds; tokens/s over the wall time)."""
    completed = [t for t in traces if t.completed]
    output_tokens = sum(t.output_tokens for t in traces)
    ttft = [t.first_token - t.arrival for t in traces if t.first_token is not None and t.arrival is not None]
    itl = [b - a for t in traces for a, b in pairwise(t.token_times)]
    e2e = [t.finish_time - t.arrival for t in completed if t.finish_time is not None and t.arrival is not None]
    errors = sorted({t.error or f"finish_reason={t.finish_reason}" for t in traces if not t.completed})
    return {
        "requests": len(traces),
        "completed": len(completed),
        "failed": len(traces) - len(completed),
        "errors": errors[:5],
        "prompt_tokens": sum(t.prompt_tokens for t in traces),
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_s": _percentiles(ttft, (50, 90, 99)),
        "itl_s": _percentiles(itl, (50, 99)),
        "e2e_s": _percentiles(e2e, (50, 99)),
    }
