"""The response cache in a Redis server, shared by several gateways.

Values are stored as plain bytes under ``prefix + key`` with a ``PX`` expiry. Memory bounds and LRU eviction are
left to Redis itself: configure the server with ``maxmemory <bytes>`` and ``maxmemory-policy allkeys-lru`` (or
``volatile-lru`` when every entry has a TTL). An optional ``max_entries`` additionally keeps an LRU index (a sorted
set) and trims the oldest entries past that count. The ``redis`` package is imported only when a ``RedisCache`` is
built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from fleetserve.gateway.cache.store import CacheBackend, check_default_ttl, check_key, check_value, resolve_ttl


def redact_url(url: str) -> str:
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
        self.default_ttl = check_default_ttl(default_ttl)
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
            raise ValueError(f"bad Redis URL {redact_url(url)}: {exc}") from None
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._client.close()
            raise ConnectionError(f"cannot reach the Redis response cache at {redact_url(url)}: {exc}") from None

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
        value = check_value(value)
        ttl = resolve_ttl(ttl, self.default_ttl)
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
        return self.prefix + check_key(key)

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
