"""Conversation sessions: which worker holds each session's KV, so that the session's next turn goes there.

A client names a session (``X-Session-Id`` or ``session_id``); the gateway keys it in the caller's namespace (two
clients' ids never meet) and remembers the worker that finished its latest turn. That worker keeps the turn's KV
pinned for its TTL (the engine's :mod:`~fleetserve.engine.kv_pins`), so the next turn, routed there, prefills only
its new tokens. When the worker is gone or draining the turn goes elsewhere, prefills the whole history there, and
the session moves (the old worker, if still up, is told to let go). What each worker actually holds comes from
its heartbeats: a session whose TTL ran out there is no longer listed. Those heartbeats go to every gateway a
worker serves, so a gateway that never saw a session (its turns went through another gateway, since lost) still
finds the worker that holds it.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.registry import WorkerRecord, WorkerRegistry

SESSION_ID = re.compile(r"[\x21-\x7e]{1,128}")
"""What a client's session id may be: 1 to 128 printable ASCII characters, no spaces."""
MAX_SESSIONS = 100_000
"""Sessions the gateway remembers; past it the least recently used is forgotten (its worker's TTL still frees
the KV)."""


def check_session_id(value: Any) -> str:
    """A client's session id, checked (InvalidRequestError names the field)."""
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise InvalidRequestError("session_id must be 1 to 128 printable ASCII characters without spaces", "session_id")
    return value


@dataclass
class SessionEntry:
    key: str
    """The session id in its caller's namespace (what workers pin it under)."""
    model: str
    worker_id: str
    worker_name: str
    turns: int
    last_used: float
    """Unix time of its latest turn's end."""


class SessionTable:
    """Session key -> the worker holding its KV; least recently used first."""

    def __init__(self, registry: WorkerRegistry, max_sessions: int = MAX_SESSIONS):
        self.registry = registry
        self.max_sessions = max_sessions
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()
        self.moved = 0
        """Turns that found their session's worker gone or busy elsewhere and moved the session."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def holder(self, key: str, model: str) -> WorkerRecord | None:
        """The routable worker holding the session for ``model``, if any: the one that finished its latest turn
        here; else, when this gateway has no such worker (the turns went through another gateway, or this one
        restarted), the routable worker of ``model`` whose heartbeat lists the session, the most recently used
        first. Workers report their sessions to every gateway they serve, so a session outlives its gateway."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry.model != model:
                return None
            record = self.registry.workers.get(entry.worker_id)
            if record is not None and record.routable:
                return record
        listed = [w for w in self.registry.members(model) if key in w.sessions and w.routable]
        return min(listed, key=lambda w: w.sessions[key].idle_s, default=None)

    def record(self, key: str, model: str, worker: WorkerRecord) -> WorkerRecord | None:
        """A turn of the session finished on ``worker``; returns the worker that held it before when that was
        another one still registered (it should release its copy)."""
        entry = self._entries.pop(key, None)
        previous = None
        if entry is not None and entry.worker_id != worker.worker_id:
            self.moved += 1
            previous = self.registry.workers.get(entry.worker_id)
        turns = entry.turns + 1 if entry is not None else 1
        self._entries[key] = SessionEntry(key, model, worker.worker_id, worker.name, turns, time.time())
        while len(self._entries) > self.max_sessions:
            self._entries.popitem(last=False)
        return previous

    def forget(self, key: str) -> SessionEntry | None:
        return self._entries.pop(key, None)

    def holders(self, key: str) -> list[WorkerRecord]:
        """Every registered worker whose heartbeat lists the session (normally one)."""
        return [w for w in self.registry.workers.values() if key in w.sessions]

    def to_json(self) -> list[dict[str, Any]]:
        """Every remembered session, newest first, with what its worker reports holding for it."""
        out = []
        for entry in reversed(self._entries.values()):
            record = self.registry.workers.get(entry.worker_id)
            pinned = record.sessions.get(entry.key) if record is not None else None
            out.append(
                {
                    "id": entry.key.split(":", 1)[-1],
                    "key": entry.key,
                    "model": entry.model,
                    "worker": entry.worker_name,
                    "worker_id": entry.worker_id,
                    "turns": entry.turns,
                    "held": pinned is not None,
                    "tokens": pinned.tokens if pinned else 0,
                    "blocks": pinned.blocks if pinned else 0,
                    "idle_s": round(pinned.idle_s, 1) if pinned else round(time.time() - entry.last_used, 1),
                    "ttl_left_s": round(pinned.ttl_left_s, 1) if pinned else 0.0,
                }
            )
        return out
