"""The in-process response cache: LRU bounded by entries and bytes, TTL per entry, optionally persisted to SQLite.

The size of an entry is the length of its value plus the UTF-8 length of its key. Getting an entry makes it the
most recently used; when a bound is exceeded the least recently used entries are evicted. A value larger than the
whole byte budget is refused (and any older value under its key is dropped). Every entry may carry a TTL (``ttl=``
on :meth:`MemoryCache.set`, or the cache's ``default_ttl``); an expired entry is a miss and is removed when it is
next touched, and expired entries are also purged periodically. Given ``path``, the cache writes through to a
SQLite file (:mod:`fleetserve.gateway.cache.sqlite_file`) and reloads it when opened again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from fleetserve.gateway.cache.sqlite_file import CacheFile
from fleetserve.gateway.cache.store import CacheBackend, check_default_ttl, check_key, check_value, resolve_ttl


class _Entry:
    __slots__ = ("value", "size", "expires_at", "wall_expires_at")

    def __init__(self, value: bytes, size: int, expires_at: float | None, wall_expires_at: float | None):
        self.value = value
        self.size = size
        self.expires_at = expires_at  # on the cache's clock
        self.wall_expires_at = wall_expires_at  # time.time() epoch seconds, as written to disk


def _lru_victims(
    entries: OrderedDict[str, _Entry], count: int, total: int, max_entries: int, max_bytes: int, keep: str | None = None
) -> list[str]:
    """The least recently used keys to drop so that ``count`` entries of ``total`` bytes fit the bounds (never
    ``keep``)."""
    victims = []
    for key, entry in entries.items():
        if count <= max_entries and total <= max_bytes:
            break
        if key == keep:
            continue
        victims.append(key)
        count -= 1
        total -= entry.size
    return victims


class MemoryCache(CacheBackend):
    """An in-process LRU cache bounded by entries and bytes, with TTLs and optional SQLite persistence.

    ``clock`` (default ``time.monotonic``) measures TTLs in memory and can be replaced in tests; deadlines written
    to ``path`` are always wall-clock. ``purge_interval`` is how often (in ``clock`` seconds) a ``set`` sweeps out
    every expired entry; expired entries are also dropped whenever they are looked up.
    """

    def __init__(
        self,
        max_entries: int = 10000,
        max_bytes: int = 256 * 2**20,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        path: str | Path | None = None,
        purge_interval: float = 60.0,
    ):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if int(max_bytes) < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.default_ttl = check_default_ttl(default_ttl)
        self.path = None if path is None else str(path)
        self._clock = clock
        self._purge_interval = float(purge_interval)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._expirations = 0
        self._closed = False
        self._next_purge = clock() + self._purge_interval
        self._file: CacheFile | None = None
        if self.path is not None:
            self._open_file(self.path)

    # -- public API --------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open()
            entry = self._live_entry(key, self._clock())
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            if self._file is not None:
                self._file.touch(key)
            return entry.value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_key(key)
        value = check_value(value)
        ttl = resolve_ttl(ttl, self.default_ttl)
        size = len(value) + len(key.encode("utf-8"))
        with self._lock:
            self._check_open()
            now = self._clock()
            if now >= self._next_purge:
                self._purge(now)
            if size > self.max_bytes:
                # Never storable; drop the older value so readers do not keep getting it.
                if key in self._entries:
                    if self._file is not None:
                        self._file.write([], [key])
                    self._remove(key)
                return
            old = self._entries.get(key)
            # Least recently used entries that must go to make room (never the key being replaced).
            count = len(self._entries) + (old is None)
            total = self._bytes - (old.size if old is not None else 0) + size
            victims = _lru_victims(self._entries, count, total, self.max_entries, self.max_bytes, keep=key)
            expires_at = None if ttl is None else now + ttl
            wall_expires_at = None if ttl is None else time.time() + ttl
            if self._file is not None:
                self._file.write([(key, value, wall_expires_at)], victims)
            for other in victims:
                expires = self._entries[other].expires_at
                self._remove(other)
                if expires is not None and expires <= now:
                    self._expirations += 1
                else:
                    self._evictions += 1
            if old is not None:
                self._remove(key)
            self._entries[key] = _Entry(value, size, expires_at, wall_expires_at)
            self._bytes += size

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            self._check_open()
            entry = self._live_entry(key, self._clock())
            if entry is None:
                return False
            if self._file is not None:
                self._file.write([], [key])
            self._remove(key)
            return True

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            self._check_open()
            return self._live_entry(key, self._clock()) is not None

    def clear(self) -> None:
        with self._lock:
            self._check_open()
            if self._file is not None:
                self._file.clear()
            self._entries.clear()
            self._bytes = 0

    def purge_expired(self) -> int:
        """Remove every expired entry now; how many were removed."""
        with self._lock:
            self._check_open()
            return self._purge(self._clock())

    def stats(self) -> dict:
        with self._lock:
            self._check_open()
            self._purge(self._clock())
            return {
                "backend": "memory" if self.path is None else "sqlite",
                "entries": len(self._entries),
                "bytes": self._bytes,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "expirations": self._expirations,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
            }

    def keys(self) -> list[str]:
        """The stored keys (expired ones included until purged), least recently used first."""
        with self._lock:
            self._check_open()
            return list(self._entries)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            file, self._file = self._file, None
            try:
                if file is not None:
                    file.close()
            finally:
                self._entries.clear()
                self._bytes = 0

    # -- helpers (called with the lock held) -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the response cache is closed")

    def _live_entry(self, key: str, now: float) -> _Entry | None:
        """The entry under ``key``; an expired one is removed (counted as an expiration) and None returned."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= now:
            self._expire(key)
            return None
        return entry

    def _expire(self, key: str) -> None:
        self._remove(key)
        self._expirations += 1
        if self._file is not None:
            self._file.drop_later(key)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def _purge(self, now: float) -> int:
        self._next_purge = now + self._purge_interval
        expired = [k for k, e in self._entries.items() if e.expires_at is not None and e.expires_at <= now]
        for key in expired:
            self._expire(key)
        return len(expired)

    def _open_file(self, path: str) -> None:
        """Open the SQLite file, read its unexpired entries back in LRU order and apply today's bounds to them."""
        file = CacheFile(path)
        with file.opening():
            wall_now = time.time()
            now = self._clock()
            for key, value, wall_expires_at in file.load(wall_now):
                size = len(value) + len(key.encode("utf-8"))
                expires_at = None if wall_expires_at is None else now + (wall_expires_at - wall_now)
                self._entries[key] = _Entry(value, size, expires_at, wall_expires_at)
                self._bytes += size
            victims = _lru_victims(self._entries, len(self._entries), self._bytes, self.max_entries, self.max_bytes)
            if victims:
                file.write([], victims)
                for key in victims:
                    self._remove(key)
                    self._evictions += 1
        self._file = file
