"""The response cache's store interface (``CacheBackend``) and the argument checks every backend shares.

A store keeps ``str`` keys and ``bytes`` values (typically an encoded response body, which it never interprets),
each with an optional TTL. Every backend is thread-safe; their methods block (SQLite and Redis do I/O), so async
code calls them from a worker thread.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod


def check_key(key: str) -> str:
    """``key``, or TypeError when it is not a non-empty string."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"cache keys are non-empty strings, not {key!r}")
    return key


def check_value(value: bytes) -> bytes:
    """``value`` as ``bytes`` (bytes-like values are copied), or TypeError for anything else."""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise TypeError(f"cache values are bytes, not {type(value).__name__}")
    return value


def resolve_ttl(ttl: float | None, default_ttl: float | None) -> float | None:
    """Seconds to live, or None for no expiry. ``math.inf`` means no expiry even when there is a default TTL."""
    if ttl is None:
        ttl = default_ttl
    if ttl is None or ttl == math.inf:
        return None
    ttl = float(ttl)
    if not ttl > 0:  # also refuses NaN
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    return ttl


def check_default_ttl(default_ttl: float | None) -> float | None:
    """A backend's ``default_ttl`` as a float (None for no expiry), or ValueError when it is not positive."""
    if default_ttl is not None:
        resolve_ttl(default_ttl, None)
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
