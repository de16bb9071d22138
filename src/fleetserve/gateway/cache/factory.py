"""Builds the response cache's store from its configuration string: ``make_cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleetserve.gateway.cache.memory import MemoryCache
from fleetserve.gateway.cache.redis_store import RedisCache, redact_url
from fleetserve.gateway.cache.store import CacheBackend

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
            f"unknown response cache scheme {scheme!r} in {redact_url(spec)!r}: use memory, redis://, rediss://, "
            "sqlite:/// or a path ending in .sqlite or .db"
        )
    if spec.lower().endswith(_SQLITE_SUFFIXES):
        return MemoryCache(path=spec, **limits)
    raise ValueError(
        f"unknown response cache location {spec!r}: use memory, redis://, rediss://, sqlite:/// "
        "or a path ending in .sqlite or .db"
    )
