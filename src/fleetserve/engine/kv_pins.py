"""KV the engine keeps after a request finishes, by name, until it is released or expires.

Two kinds:

- a **session**: a conversation's latest turn. Its blocks stay pinned for a TTL so that the next turn, whose
  prompt begins with this one's tokens, finds them in the prefix cache and prefills only what is new. A new turn
  of the session replaces the pin (its own blocks hold the shared prefix by then). Sessions are bounded in number
  and in the share of the cache they hold together; over a bound, the longest idle session goes first.
- a **transfer**: a prefill's KV waiting for a decode worker to fetch it (single use, short TTL).

A pin holds a finished request's blocks (the scheduler keeps such a request until released), never a running
one's: pinned sessions can crowd out other sessions, but not the requests being served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.config import RetentionConfig

log = logging.getLogger(__name__)

SESSION = "session"
TRANSFER = "transfer"


@dataclass
class Pin:
    """One retained request's KV."""

    kind: str
    key: str
    """The session id, or the transfer's (the prefill request's) id."""
    request_id: str
    tokens: int
    """Tokens whose KV it holds."""
    blocks: int
    ttl_s: float
    last_used: float
    token_ids: list[int] = field(default_factory=list)
    """The tokens whose KV it holds."""
    block_table: list[int] = field(default_factory=list)
    """Where that KV is: blocks no step writes while pinned (full blocks are shared read-only, the rest is the
    finished request's own), so another thread may read them."""
    claimed: bool = False
    """A reader is copying the KV out: the pin does not expire until it is released."""

    @property
    def expires_at(self) -> float:
        return self.last_used + self.ttl_s


@dataclass
class PinnedKV:
    """A pin as the engine reports it (stats, the worker's heartbeat, the admin API)."""

    kind: str
    key: str
    tokens: int
    blocks: int
    idle_s: float
    ttl_left_s: float


class KVPins:
    """The engine's pins. ``release`` frees a finished request's retained blocks (the scheduler's)."""

    def __init__(
        self,
        release: Callable[[str], None],
        num_blocks: Callable[[], int],
        config: RetentionConfig,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._release = release
        self._num_blocks = num_blocks
        self.config = config
        self.clock = clock
        self._pins: dict[tuple[str, str], Pin] = {}
        self._lock = threading.Lock()
        """Guards the pins against a reader's ``claim`` from another thread (everything else is the engine's)."""
        self.released_over_limit = 0
        """Sessions released early to stay within max_sessions or the cache share."""

    def __len__(self) -> int:
        return len(self._pins)

    def pin(
        self,
        kind: str,
        key: str,
        request_id: str,
        token_ids: list[int],
        block_table: list[int],
        ttl_s: float | None = None,
    ) -> bool:
        """Keep ``request_id``'s blocks (``block_table``, holding the KV of ``token_ids``) under (kind, key),
        replacing what that key held. For a session, release the longest idle others while over a bound; False (and
        nothing kept) when this one alone is over the share."""
        default = self.config.session_ttl_s if kind == SESSION else self.config.transfer_ttl_s
        ttl = min(ttl_s, default) if ttl_s else default
        self.release(kind, key)
        blocks = len(block_table)
        pin = Pin(kind, key, request_id, len(token_ids), blocks, ttl, self.clock(), list(token_ids), list(block_table))
        if kind == SESSION and blocks > self._session_block_budget():
            log.info("session %s holds %d KV blocks, over the sessions' share of the cache: not kept", key, blocks)
            self._release(request_id)
            return False
        with self._lock:
            self._pins[(kind, key)] = pin
        if kind == SESSION:
            self._enforce_session_bounds(keep=pin)
        return True

    def touch(self, kind: str, key: str) -> None:
        """The pin is in use again (a session's next turn arrived): its TTL starts over."""
        pin = self._pins.get((kind, key))
        if pin is not None:
            pin.last_used = self.clock()

    def claim(self, kind: str, key: str) -> Pin | None:
        """Mark a pin as being read (any thread): it cannot expire until released. None when there is none."""
        with self._lock:
            pin = self._pins.get((kind, key))
            if pin is not None:
                pin.claimed = True
            return pin

    def release(self, kind: str, key: str) -> bool:
        """Free a pin's blocks (the engine's thread)."""
        with self._lock:
            pin = self._pins.pop((kind, key), None)
        if pin is None:
            return False
        self._release(pin.request_id)
        return True

    def release_request(self, request_id: str) -> bool:
        """Release the pin holding ``request_id``'s KV, if one does."""
        for (kind, key), pin in list(self._pins.items()):
            if pin.request_id == request_id:
                return self.release(kind, key)
        return False

    def clear(self) -> None:
        """Forget every pin without releasing anything: the KV pool they held is gone (the engine started over)."""
        with self._lock:
            self._pins.clear()

    def expire(self) -> int:
        """Release every pin past its TTL; how many."""
        now = self.clock()
        with self._lock:
            gone = [k for k, pin in self._pins.items() if pin.expires_at <= now and not pin.claimed]
        for kind, key in gone:
            self.release(kind, key)
        return len(gone)

    def next_expiry(self) -> float | None:
        """When the soonest pin expires (the clock's time), or None."""
        return min((pin.expires_at for pin in self._pins.values()), default=None)

    def session_blocks(self) -> int:
        return self.counts()["pinned_session_blocks"]

    def counts(self) -> dict[str, int]:
        """Pinned sessions, their blocks and pinned transfers, in one pass (for the engine's stats each step)."""
        sessions = blocks = transfers = 0
        for p in self._pins.values():
            if p.kind == SESSION:
                sessions += 1
                blocks += p.blocks
            else:
                transfers += 1
        return {"pinned_sessions": sessions, "pinned_session_blocks": blocks, "pinned_transfers": transfers}

    def report(self) -> list[PinnedKV]:
        now = self.clock()
        return [
            PinnedKV(p.kind, p.key, p.tokens, p.blocks, now - p.last_used, max(0.0, p.expires_at - now))
            for p in self._pins.values()
        ]

    def _session_block_budget(self) -> int:
        return int(self.config.session_cache_share * self._num_blocks())

    def _enforce_session_bounds(self, keep: Pin) -> None:
        sessions = sorted((p for p in self._pins.values() if p.kind == SESSION), key=lambda p: p.last_used)
        count, blocks = len(sessions), sum(p.blocks for p in sessions)
        budget = self._session_block_budget()
        for pin in sessions:
            if count <= self.config.max_sessions and blocks <= budget:
                return
            if pin is keep:
                continue
            log.info("releasing idle session %s (%d blocks) to stay within the sessions' bounds", pin.key, pin.blocks)
            self.release(SESSION, pin.key)
            self.released_over_limit += 1
            count, blocks = count - 1, blocks - pin.blocks
