"""The gateway's response cache: finished answers of deterministic requests, kept in a key-value store.

* :mod:`~fleetserve.gateway.cache.answers`: what goes in (``AnswerCache``) and when the cache is skipped
  (``bypassed``: ``Cache-Control: no-cache`` or ``no-store`` on the request);
* :mod:`~fleetserve.gateway.cache.keys`: which requests may be cached and their keys;
* :mod:`~fleetserve.gateway.cache.store`: the store interface every backend implements;
* :mod:`~fleetserve.gateway.cache.memory`: in-process LRU with TTLs and byte bounds, optionally persisted by
  :mod:`~fleetserve.gateway.cache.sqlite_file`;
* :mod:`~fleetserve.gateway.cache.redis_store`: one cache shared by several gateways through Redis;
* :mod:`~fleetserve.gateway.cache.factory`: ``make_cache``, a backend from a configuration string.
"""

from fleetserve.gateway.cache.answers import AnswerCache, bypassed
from fleetserve.gateway.cache.factory import make_cache
from fleetserve.gateway.cache.keys import cache_key, is_cacheable
from fleetserve.gateway.cache.memory import MemoryCache
from fleetserve.gateway.cache.redis_store import RedisCache
from fleetserve.gateway.cache.store import CacheBackend

__all__ = [
    "AnswerCache",
    "CacheBackend",
    "MemoryCache",
    "RedisCache",
    "bypassed",
    "cache_key",
    "is_cacheable",
    "make_cache",
]
