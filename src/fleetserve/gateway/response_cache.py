"""The gateway's response cache: finished responses of deterministic requests, kept in a key-value store.

What is cached
    Only requests whose output is fully determined by their input: greedy decoding (``temperature == 0``) or
    sampling with a fixed ``seed`` (see :func:`is_cacheable`). The value is whatever the gateway chooses to store
    for a response, as ``bytes`` (typically the encoded JSON body); this module stores it as opaque bytes and never
    interprets it.

The key
    :func:`cache_key` is the SHA-256 hex digest of a canonical JSON document (sorted keys, no whitespace) holding
    the model name, the model version, the prompt's token ids and every parameter that shapes the output
    (sampling parameters, stop strings, ``max_tokens``, ...). Keying on token ids rather than on text makes the
    key independent of how the prompt was phrased (chat messages or raw text) once it has been templated and
    tokenized; keying on the model version makes a redeployed model miss instead of serving stale answers.

Bounds
    :class:`MemoryCache` is an LRU cache bounded both by its number of entries and by its size in bytes (the size
    of an entry is the length of its value plus the UTF-8 length of its key). Getting an entry makes it the most
    recently used; when a bound is exceeded the least recently used entries are evicted. A value larger than the
    whole byte budget is refused (and any older value under its key is dropped). Every entry may carry a TTL
    (``ttl=`` on :meth:`CacheBackend.set`, or the cache's ``default_ttl``); an expired entry is a miss and is
    removed when it is next touched, and expired entries are also purged periodically.

Persistence
    Given ``path``, a :class:`MemoryCache` writes every ``set``/``delete`` (and its evictions) through to a SQLite
    file and reloads the unexpired entries, in LRU order, when it is opened again, so the cache survives a gateway
    restart. Deadlines are kept on disk as wall-clock (``time.time()``) epoch seconds and converted to the cache's
    own clock on load. Refreshes of the LRU order by ``get`` are written in batches (and on ``close``), so a crash
    may lose the most recent reordering but never an entry.

Redis
    :class:`RedisCache` offers the same interface over a Redis server so several gateways share one cache. Values
    are stored as plain bytes under ``prefix + key`` with a ``PX`` expiry. Memory bounds and LRU eviction are left
    to Redis itself: configure the server with ``maxmemory <bytes>`` and ``maxmemory-policy allkeys-lru`` (or
    ``volatile-lru`` when every entry has a TTL). An optional ``max_entries`` additionally keeps an LRU index (a
    sorted set) and trims the oldest entries past that count. The ``redis`` package is imported only when a
    ``RedisCache`` is built.

Bypassing the cache
    A request carrying ``Cache-Control: no-cache`` is neither answered from nor stored into the cache; the gateway
    checks the header before it consults this module.

All backends are thread-safe. Their methods block (SQLite and Redis do I/O), so async code should call them from a
worker thread. :func:`make_cache` builds a backend from a configuration string.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "CacheBackend",
    "MemoryCache",
    "RedisCache",
    "cache_key",
    "is_cacheable",
    "make_cache",
]

KEY_FORMAT_VERSION = 1
"""Part of every cache key: bumping it invalidates every stored entry at once."""

_STAT_FIELDS = ("entries", "bytes", "hits", "misses", "evictions", "expirations")


# -- keys --------------------------------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """``value`` with integral floats turned into ints, so ``1.0`` and ``1`` give the same key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def cache_key(model: str, model_version: str, prompt_token_ids: list[int], params: dict) -> str:
    """The cache key of one request: a 64-character SHA-256 hex digest, with no prefix.

    The digest covers a canonical JSON document (``sort_keys=True``, compact separators, UTF-8) of the model name,
    the model version, the prompt's token ids and ``params``, plus a format version. ``params`` must hold every
    request field that changes the output and only JSON values (strings, numbers, booleans, None, lists, dicts);
    integral floats are normalised (``1.0`` keys like ``1``). Keys of dicts are sorted at every depth, so the
    order in which parameters were given does not matter. NaN or infinite numbers raise ``ValueError``; values
    JSON cannot encode raise ``TypeError``.
    """
    document = {
        "v": KEY_FORMAT_VERSION,
        "model": str(model),
        "model_version": str(model_version),
        "prompt_token_ids": [int(t) for t in prompt_token_ids],
        "params": _canonical(dict(params)),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_cacheable(temperature: float, seed: int | None) -> bool:
    """Whether a request's output is deterministic, and so may be served from the cache.

    True for greedy decoding (``temperature == 0``) and for any request with a fixed ``seed`` (the engine seeds
    each request's sampler from it, so the same seed replays the same tokens).
    """
    return seed is not None or temperature == 0


# -- the interface -----------------------------------------------------------------------------------------------


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"cache keys are non-empty strings, not {key!r}")
    return key


def _check_value(value: bytes) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"cache values are bytes, not {type(value).__name__}")
    return value


def _resolve_ttl(ttl: float | None, default_ttl: float | None) -> float | None:
    """Seconds to live, or None for no expiry. ``math.inf`` means no expiry even when there is a default TTL."""
    if ttl is None:
        ttl = default_ttl
    if ttl is None or ttl == math.inf:
        return None
    ttl = float(ttl)
    if not ttl > 0:  # also refuses NaN
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    return ttl


def _check_default_ttl(default_ttl: float | None) -> float | None:
    if default_ttl is not None:
        _resolve_ttl(default_ttl, None)
        return float(default_ttl)
    return None


class CacheBackend(ABC):
    """A key-value store of response bodies: ``str`` keys, ``bytes`` values, optional TTL per entry."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None when it is absent or expired (a miss)."""

    @abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any older value.

        ``ttl`` is in seconds; None uses the backend's default TTL (itself None for no expiry) and ``math.inf``
        means no expiry. A TTL that is zero or negative raises ``ValueError``.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True when an entry was removed."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an unexpired entry is stored under ``key``.

        Not counted as a hit or a miss, and it does not move the entry in this cache's own LRU order.
        """

    @abstractmethod
    def clear(self) -> None:
        """Remove every entry. The hit, miss, eviction and expiration counters are kept."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: ``entries``, ``bytes``, ``hits``, ``misses``, ``evictions``, ``expirations`` (and more)."""

    @abstractmethod
    def close(self) -> None:
        """Release files and connections. Calling it again does nothing; other calls afterwards raise."""

    def __enter__(self) -> CacheBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- memory, optionally persisted to SQLite ---------------------------------------------------------------------


_SQLITE_TABLE = "response_cache"
_SQLITE_SCHEMA = f"""
    CREATE TABLE IF NOT EXISTS {_SQLITE_TABLE} (
        key        TEXT PRIMARY KEY,
        value      BLOB NOT NULL,
        expires_at REAL,
        last_used  REAL NOT NULL
    )
"""
_SQLITE_COLUMNS = {"key", "value", "expires_at", "last_used"}


class _Entry:
    __slots__ = ("value", "size", "expires_at", "wall_expires_at")

    def __init__(self, value: bytes, size: int, expires_at: float | None, wall_expires_at: float | None):
        self.value = value
        self.size = size
        self.expires_at = expires_at  # on the cache's clock
        self.wall_expires_at = wall_expires_at  # time.time() epoch seconds, as written to disk


class MemoryCache(CacheBackend):
    """An in-process LRU cache bounded by entries and bytes, with TTLs and optional SQLite persistence.

    ``clock`` (default ``time.monotonic``) measures TTLs in memory and can be replaced in tests; deadlines written
    to ``path`` are always wall-clock. ``purge_interval`` is how often (in ``clock`` seconds) a ``set`` sweeps out
    every expired entry; expired entries are also dropped whenever they are looked up.
    """

    # Pending LRU refreshes are written to disk once this many have piled up (or with the next write).
    _TOUCH_BATCH = 256

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
        self.default_ttl = _check_default_ttl(default_ttl)
        self.path = None if path is None else str(path)
        self._clock = clock
        self._purge_interval = float(purge_interval)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._expirations = 0
        self._closed = False
        self._next_purge = clock() + self._purge_interval
        # Persistence state: the connection, writes not yet on disk, and the last LRU stamp handed out.
        self._conn: sqlite3.Connection | None = None
        self._pending_touch: dict[str, float] = {}
        self._pending_delete: set[str] = set()
        self._stamp = 0.0
        if self.path is not None:
            self._open_file()

    # -- public API --------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        _check_key(key)
        with self._lock:
            self._check_open()
            entry = self._live_entry(key, self._clock())
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            if self._conn is not None:
                self._pending_touch[key] = self._next_stamp()
                if len(self._pending_touch) >= self._TOUCH_BATCH:
                    self._persist([], [])
            return entry.value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_key(key)
        value = _check_value(value)
        ttl = _resolve_ttl(ttl, self.default_ttl)
        size = len(value) + len(key.encode("utf-8"))
        with self._lock:
            self._check_open()
            now = self._clock()
            if now >= self._next_purge:
                self._purge(now)
            if size > self.max_bytes:
                # Never storable; drop the older value so readers do not keep getting it.
                if key in self._entries:
                    if self._conn is not None:
                        self._persist([], [key])
                    self._remove(key)
                return
            old = self._entries.get(key)
            # Least recently used entries that must go to make room (never the key being replaced).
            entries = len(self._entries) + (old is None)
            total = self._bytes - (old.size if old is not None else 0) + size
            victims = []
            for other, entry in self._entries.items():
                if entries <= self.max_entries and total <= self.max_bytes:
                    break
                if other == key:
                    continue
                victims.append(other)
                entries -= 1
                total -= entry.size
            expires_at = None if ttl is None else now + ttl
            wall_expires_at = None if ttl is None else time.time() + ttl
            if self._conn is not None:
                self._persist([(key, value, wall_expires_at, self._next_stamp())], victims)
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
        _check_key(key)
        with self._lock:
            self._check_open()
            entry = self._live_entry(key, self._clock())
            if entry is None:
                return False
            if self._conn is not None:
                self._persist([], [key])
            self._remove(key)
            return True

    def exists(self, key: str) -> bool:
        _check_key(key)
        with self._lock:
            self._check_open()
            return self._live_entry(key, self._clock()) is not None

    def clear(self) -> None:
        with self._lock:
            self._check_open()
            if self._conn is not None:
                with self._transaction() as conn:
                    conn.execute(f"DELETE FROM {_SQLITE_TABLE}")
                self._pending_touch.clear()
                self._pending_delete.clear()
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
            try:
                if self._conn is not None and (self._pending_touch or self._pending_delete):
                    self._persist([], [])
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._entries.clear()
                self._bytes = 0

    # -- in-memory helpers (called with the lock held) -----------------------------------------------------------

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
        if self._conn is not None:
            # Expired rows are skipped on load anyway, so their deletion can wait for the next write.
            self._pending_touch.pop(key, None)
            self._pending_delete.add(key)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def _purge(self, now: float) -> int:
        self._next_purge = now + self._purge_interval
        expired = [k for k, e in self._entries.items() if e.expires_at is not None and e.expires_at <= now]
        for key in expired:
            self._expire(key)
        return len(expired)

    def _next_stamp(self) -> float:
        """A strictly increasing wall-clock stamp for the ``last_used`` column (equal readings are bumped)."""
        now = time.time()
        self._stamp = now if now > self._stamp else math.nextafter(self._stamp, math.inf)
        return self._stamp

    # -- SQLite -----------------------------------------------------------------------------------------------

    def _open_file(self) -> None:
        assert self.path is not None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open response cache database {self.path}: {exc}") from None
        try:
            self._conn = conn
            self._prepare_file()
            self._load()
        except ValueError:
            conn.close()
            self._conn = None
            raise
        except sqlite3.Error as exc:
            conn.close()
            self._conn = None
            raise ValueError(f"{self.path} is not a usable response cache database: {exc}") from None

    def _prepare_file(self) -> None:
        conn = self._conn
        assert conn is not None
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and _SQLITE_TABLE not in tables:
            raise ValueError(
                f"{self.path} is a SQLite database of another program (tables: {', '.join(sorted(tables))}), "
                "not a fleetserve response cache"
            )
        if _SQLITE_TABLE in tables:
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({_SQLITE_TABLE})")}
            if not columns.issuperset(_SQLITE_COLUMNS):
                raise ValueError(
                    f"{self.path} has a {_SQLITE_TABLE} table without column(s) "
                    f"{', '.join(sorted(_SQLITE_COLUMNS - columns))}"
                )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(_SQLITE_SCHEMA)

    def _load(self) -> None:
        """Read the unexpired rows back, least recently used first, and apply today's bounds to them."""
        conn = self._conn
        assert conn is not None
        wall_now = time.time()
        now = self._clock()
        with self._transaction():
            conn.execute(f"DELETE FROM {_SQLITE_TABLE} WHERE expires_at IS NOT NULL AND expires_at <= ?", (wall_now,))
        rows = conn.execute(
            f"SELECT key, value, expires_at, last_used FROM {_SQLITE_TABLE} ORDER BY last_used, key"
        ).fetchall()
        for key, value, wall_expires_at, last_used in rows:
            value = bytes(value)
            size = len(value) + len(key.encode("utf-8"))
            expires_at = None if wall_expires_at is None else now + (wall_expires_at - wall_now)
            self._entries[key] = _Entry(value, size, expires_at, wall_expires_at)
            self._bytes += size
            self._stamp = max(self._stamp, float(last_used))
        victims = []
        entries, total = len(self._entries), self._bytes
        for key, entry in self._entries.items():
            if entries <= self.max_entries and total <= self.max_bytes:
                break
            victims.append(key)
            entries -= 1
            total -= entry.size
        if victims:
            self._persist([], victims)
            for key in victims:
                self._remove(key)
                self._evictions += 1

    def _transaction(self) -> _Transaction:
        assert self._conn is not None
        return _Transaction(self._conn)

    def _persist(self, upserts: list[tuple[str, bytes, float | None, float]], deletes: list[str]) -> None:
        """Write the pending refreshes and deletions plus this operation's changes in one transaction."""
        written = {row[0] for row in upserts} | set(deletes)
        touches = [(stamp, key) for key, stamp in self._pending_touch.items() if key not in written]
        dropped = [(key,) for key in self._pending_delete if key not in written]
        with self._transaction() as conn:
            if touches:
                conn.executemany(f"UPDATE {_SQLITE_TABLE} SET last_used = ? WHERE key = ?", touches)
            if dropped or deletes:
                conn.executemany(f"DELETE FROM {_SQLITE_TABLE} WHERE key = ?", dropped + [(k,) for k in deletes])
            if upserts:
                conn.executemany(
                    f"""
                    INSERT INTO {_SQLITE_TABLE} (key, value, expires_at, last_used) VALUES (?, ?, ?, ?)
                    ON CONFLICT (key) DO UPDATE SET
                        value = excluded.value, expires_at = excluded.expires_at, last_used = excluded.last_used
                    """,
                    upserts,
                )
        self._pending_touch.clear()
        self._pending_delete.clear()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on an autocommit connection, rolled back when the body raises."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


# -- Redis -------------------------------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _glob_escape(text: str) -> str:
    """``text`` with Redis glob-pattern metacharacters escaped, for ``SCAN MATCH``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCache(CacheBackend):
    """The cache in a Redis server, shared by every gateway that uses the same URL and prefix.

    Values are stored as bytes under ``prefix + key`` (``SET ... PX``). Redis bounds memory and evicts on its own
    (``maxmemory`` with ``maxmemory-policy allkeys-lru``). With ``max_entries``, an LRU index (a sorted set named
    ``prefix + "\\0lru"``) is kept as well and the least recently used entries past that count are deleted.

    ``hits``, ``misses``, ``evictions`` (by ``max_entries``) and ``expirations`` (entries seen expired by this
    process: always 0, as Redis expires keys silently) are counted in this process; ``entries`` and ``bytes`` are
    counted on the server by scanning the prefix, and ``server_evicted_keys`` / ``server_expired_keys`` are the
    server-wide totals from ``INFO stats``.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "fleetserve:cache:",
        default_ttl: float | None = None,
        max_entries: int | None = None,
        socket_timeout: float | None = 5.0,
    ):
        try:
            import redis
        except ImportError:
            raise ValueError(
                "a Redis response cache needs the redis package: pip install redis (or use a memory cache)"
            ) from None
        if not prefix:
            raise ValueError("a Redis cache needs a non-empty key prefix")
        if max_entries is not None and int(max_entries) < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.url = url
        self.prefix = prefix
        self.default_ttl = _check_default_ttl(default_ttl)
        self.max_entries = None if max_entries is None else int(max_entries)
        self._index = f"{prefix}\0lru"
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0
        self._last_score = 0
        self._closed = False
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        except ValueError as exc:
            raise ValueError(f"bad Redis URL {_redact(url)}: {exc}") from None
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._client.close()
            raise ConnectionError(f"cannot reach the Redis response cache at {_redact(url)}: {exc}") from None

    # -- public API --------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        name = self._name(key)
        self._check_open()
        if self.max_entries is None:
            value = self._client.get(name)
        else:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(name)
            pipe.zadd(self._index, {name: self._now_us()}, xx=True)
            value, _ = pipe.execute()
        with self._lock:
            if value is None:
                self._misses += 1
            else:
                self._hits += 1
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        name = self._name(key)
        value = _check_value(value)
        ttl = _resolve_ttl(ttl, self.default_ttl)
        self._check_open()
        px = None if ttl is None else max(1, round(ttl * 1000))
        if self.max_entries is None:
            self._client.set(name, value, px=px)
            return
        pipe = self._client.pipeline(transaction=True)
        pipe.set(name, value, px=px)
        pipe.zadd(self._index, {name: self._now_us()})
        pipe.zcard(self._index)
        count = pipe.execute()[-1]
        if count > self.max_entries:
            # ZPOPMIN is atomic, so concurrent gateways never pick the same victim twice.
            victims = [member for member, _ in self._client.zpopmin(self._index, count - self.max_entries)]
            removed = self._client.delete(*victims) if victims else 0  # entries already expired count for nothing
            with self._lock:
                self._evictions += removed

    def delete(self, key: str) -> bool:
        name = self._name(key)
        self._check_open()
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(name)
        if self.max_entries is not None:
            pipe.zrem(self._index, name)
        return pipe.execute()[0] > 0

    def exists(self, key: str) -> bool:
        name = self._name(key)
        self._check_open()
        return self._client.exists(name) > 0

    def clear(self) -> None:
        self._check_open()
        for batch in self._scan_batches():
            self._client.delete(*batch)
        self._client.delete(self._index)

    def stats(self) -> dict:
        self._check_open()
        entries = size = 0
        prefix_len = len(self.prefix.encode("utf-8"))
        for batch in self._scan_batches():
            pipe = self._client.pipeline(transaction=False)
            for name in batch:
                pipe.exists(name)
                pipe.strlen(name)
            replies = pipe.execute()
            for name, present, length in zip(batch, replies[::2], replies[1::2]):
                if present:  # 0: expired (or deleted) between SCAN and now
                    entries += 1
                    size += length + len(name) - prefix_len
        info = self._client.info("stats")
        with self._lock:
            return {
                "backend": "redis",
                "entries": entries,
                "bytes": size,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "expirations": 0,
                "max_entries": self.max_entries,
                "server_evicted_keys": int(info.get("evicted_keys", 0)),
                "server_expired_keys": int(info.get("expired_keys", 0)),
            }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the response cache is closed")

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _now_us(self) -> int:
        """The LRU index's score: wall-clock microseconds, strictly increasing within this process."""
        with self._lock:
            self._last_score = max(time.time_ns() // 1000, self._last_score + 1)
            return self._last_score

    def _scan_batches(self, count: int = 500) -> Iterator[list[bytes]]:
        """The names stored under the prefix (the LRU index excluded), in batches as SCAN returns them."""
        index = self._index.encode("utf-8")
        cursor = 0
        pattern = _glob_escape(self.prefix) + "*"
        while True:
            cursor, names = self._client.scan(cursor=cursor, match=pattern, count=count)
            batch = [n for n in names if n != index]
            if batch:
                yield batch
            if cursor == 0:
                return


# -- configuration -----------------------------------------------------------------------------------------------

_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def make_cache(url_or_path: str | Path | None, **limits: Any) -> CacheBackend:
    """A cache backend from a configuration string; ``limits`` go to the backend's constructor.

    * None, ``""`` or ``"memory"``: a :class:`MemoryCache` (``max_entries``, ``max_bytes``, ``default_ttl``, ...).
    * ``redis://...`` or ``rediss://...``: a :class:`RedisCache` (``prefix``, ``default_ttl``, ``max_entries``).
      ``max_bytes`` and ``clock`` are ignored there: Redis bounds its memory with ``maxmemory``.
    * ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db``, or a plain path ending in ``.sqlite``,
      ``.sqlite3`` or ``.db``: a :class:`MemoryCache` persisted to that file.

    Anything else raises ``ValueError``.
    """
    if url_or_path is None:
        return MemoryCache(**limits)
    spec = str(url_or_path).strip()
    if spec in ("", "memory"):
        return MemoryCache(**limits)
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme in ("redis", "rediss"):
            limits = {k: v for k, v in limits.items() if k not in ("max_bytes", "clock")}
            return RedisCache(spec, **limits)
        if scheme == "sqlite":
            if not spec.startswith("sqlite:///") or len(spec) == len("sqlite:///"):
                raise ValueError(
                    f"a SQLite cache URL is sqlite:///relative/path or sqlite:////absolute/path, not {spec!r}"
                )
            return MemoryCache(path=spec[len("sqlite:///") :], **limits)
        raise ValueError(
            f"unknown response cache scheme {scheme!r} in {_redact(spec)!r}: use memory, redis://, rediss://, "
            "sqlite:/// or a path ending in .sqlite or .db"
        )
    if spec.lower().endswith(_SQLITE_SUFFIXES):
        return MemoryCache(path=spec, **limits)
    raise ValueError(
        f"unknown response cache location {spec!r}: use memory, redis://, rediss://, sqlite:/// "
        "or a path ending in .sqlite or .db"
    )
