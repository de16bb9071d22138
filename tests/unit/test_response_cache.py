"""The gateway's response cache: LRU and TTL in memory, SQLite persistence, threads, keys, and Redis."""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import threading
import time
import uuid

import pytest

from fleetserve.bench.local_fleet import free_port
from fleetserve.gateway.cache import (
    CacheBackend,
    MemoryCache,
    RedisCache,
    cache_key,
    is_cacheable,
    make_cache,
)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def size(key: str, value: bytes) -> int:
    return len(key) + len(value)


def rows(path) -> dict[str, tuple]:
    conn = sqlite3.connect(path)
    try:
        return {k: (bytes(v), e) for k, v, e in conn.execute("SELECT key, value, expires_at FROM response_cache")}
    finally:
        conn.close()


# -- memory: LRU, TTL, bounds ---------------------------------------------------------------------------------


def test_basic_operations_and_stats():
    cache = MemoryCache()
    assert isinstance(cache, CacheBackend)
    assert cache.get("a") is None
    cache.set("a", b"one")
    cache.set("b", bytearray(b"two"))  # bytes-like values are stored as bytes
    assert cache.get("a") == b"one"
    assert cache.get("b") == b"two" and isinstance(cache.get("b"), bytes)
    assert cache.exists("a") and not cache.exists("zz")
    cache.set("a", b"uno")  # replaces
    assert cache.get("a") == b"uno"
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert not cache.exists("a")
    stats = cache.stats()
    assert {k: stats[k] for k in ("entries", "bytes", "hits", "misses", "evictions", "expirations")} == {
        "entries": 1,
        "bytes": size("b", b"two"),
        "hits": 4,
        "misses": 1,
        "evictions": 0,
        "expirations": 0,
    }
    cache.clear()
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    assert cache.stats()["hits"] == 4  # counters survive clear()
    cache.close()
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.get("b")


def test_rejects_bad_keys_values_and_ttls():
    cache = MemoryCache()
    with pytest.raises(TypeError):
        cache.set("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.set("", b"v")
    for ttl in (0, -1, math.nan):
        with pytest.raises(ValueError, match="ttl"):
            cache.set("k", b"v", ttl=ttl)
    with pytest.raises(ValueError):
        MemoryCache(default_ttl=0)
    with pytest.raises(ValueError):
        MemoryCache(max_entries=0)


def test_lru_order_access_refreshes_and_oldest_goes_first():
    cache = MemoryCache(max_entries=3)
    for key in "abc":
        cache.set(key, key.encode())
    assert cache.keys() == ["a", "b", "c"]
    assert cache.get("a") == b"a"  # a is now the most recently used
    assert cache.keys() == ["b", "c", "a"]
    cache.set("d", b"d")  # evicts b, the least recently used
    assert cache.keys() == ["c", "a", "d"]
    assert not cache.exists("b")
    cache.set("c", b"C")  # overwriting refreshes too
    cache.set("e", b"e")  # evicts a
    assert cache.keys() == ["d", "c", "e"]
    assert cache.stats()["evictions"] == 2
    assert cache.exists("d")  # exists() does not refresh
    assert cache.keys() == ["d", "c", "e"]


def test_ttl_per_entry_and_default_with_injected_clock():
    clock = FakeClock()
    cache = MemoryCache(default_ttl=10, clock=clock)
    cache.set("default", b"1")  # 10 s
    cache.set("short", b"2", ttl=2)
    cache.set("forever", b"3", ttl=math.inf)
    clock.advance(1.999)
    assert cache.get("short") == b"2"
    clock.advance(0.001)
    assert cache.get("short") is None  # expires at its deadline
    assert cache.exists("default")
    clock.advance(8)
    assert not cache.exists("default")
    clock.advance(10_000)
    assert cache.get("forever") == b"3"
    stats = cache.stats()
    assert stats["expirations"] == 2 and stats["entries"] == 1 and stats["bytes"] == size("forever", b"3")
    assert stats["misses"] == 1 and stats["hits"] == 2


def test_expired_entries_are_purged_without_being_touched():
    clock = FakeClock()
    cache = MemoryCache(clock=clock, purge_interval=5)
    for i in range(10):
        cache.set(f"k{i}", b"x", ttl=1 + i % 2 * 100)  # five expire after 1 s, five after 101 s
    clock.advance(6)
    cache.set("trigger", b"y")  # the periodic sweep runs on this set
    assert len(cache.keys()) == 6
    assert cache.stats()["expirations"] == 5
    clock.advance(200)
    assert cache.purge_expired() == 5
    assert cache.keys() == ["trigger"]


def test_expired_entries_go_before_live_ones_and_are_not_evictions():
    clock = FakeClock()
    cache = MemoryCache(max_entries=2, clock=clock)
    cache.set("old", b"1", ttl=1)
    cache.set("live", b"2")
    clock.advance(2)
    cache.set("new", b"3")
    stats = cache.stats()
    assert cache.keys() == ["live", "new"] and stats["evictions"] == 0 and stats["expirations"] == 1


def test_entry_bound():
    cache = MemoryCache(max_entries=5)
    for i in range(12):
        cache.set(f"k{i}", b"v")
    assert cache.keys() == [f"k{i}" for i in range(7, 12)]
    assert cache.stats()["entries"] == 5 and cache.stats()["evictions"] == 7


def test_byte_bound_and_oversized_value_refused():
    cache = MemoryCache(max_bytes=100)
    cache.set("a", b"x" * 39)  # 40 bytes with its key
    cache.set("b", b"x" * 39)
    assert cache.stats()["bytes"] == 80
    cache.set("c", b"x" * 29)  # 30 more: a must go
    assert cache.keys() == ["b", "c"] and cache.stats()["bytes"] == 70
    cache.set("d", b"x" * 99)  # exactly the budget: everything else goes
    assert cache.keys() == ["d"] and cache.stats()["bytes"] == 100
    cache.set("e", b"x" * 100)  # 101 bytes: never stored, nothing evicted for it
    assert cache.keys() == ["d"] and cache.get("e") is None
    cache.set("d", b"x" * 200)  # an oversized replacement drops the stale value
    assert cache.get("d") is None and cache.stats()["bytes"] == 0
    assert cache.stats()["evictions"] == 3


def test_replacing_a_value_updates_bytes():
    cache = MemoryCache(max_bytes=50)
    cache.set("k", b"x" * 10)
    cache.set("k", b"x" * 40)
    assert cache.stats()["bytes"] == 41 and cache.stats()["evictions"] == 0


# -- persistence --------------------------------------------------------------------------------------------------


def test_persistence_survives_close_and_reopen_in_lru_order(tmp_path):
    path = tmp_path / "state" / "cache.sqlite"  # missing folders are created
    cache = MemoryCache(path=path)
    for key in "abcd":
        cache.set(key, key.encode() * 3)
    cache.get("a")  # a becomes the most recently used
    cache.delete("c")
    cache.close()

    with MemoryCache(path=str(path)) as cache:
        assert cache.keys() == ["b", "d", "a"]
        assert cache.get("b") == b"bbb" and cache.get("c") is None
        assert cache.stats()["bytes"] == 3 * 4
        assert cache.stats()["backend"] == "sqlite"

    # Reopening with a smaller bound keeps the most recently used entries and forgets the rest on disk too.
    with MemoryCache(path=path, max_entries=2) as cache:
        assert cache.keys() == ["a", "b"]
        assert cache.stats()["evictions"] == 1
    assert set(rows(path)) == {"a", "b"}


def test_persistence_writes_through_evictions_and_clear(tmp_path):
    path = tmp_path / "cache.db"
    cache = MemoryCache(path=path, max_entries=2)
    cache.set("a", b"1")
    cache.set("b", b"2")
    cache.set("c", b"3")
    assert set(rows(path)) == {"b", "c"}  # written before close
    cache.set("b", b"x" * (300 * 2**20))  # oversized replacement: dropped from disk as well
    assert set(rows(path)) == {"c"}
    cache.clear()
    assert rows(path) == {}
    cache.close()


def test_ttl_survives_as_wall_clock_deadline(tmp_path):
    path = tmp_path / "cache.sqlite"
    clock = FakeClock(now=5_000_000.0)  # far from time.time(): the disk must hold wall-clock deadlines
    cache = MemoryCache(path=path, clock=clock, default_ttl=100)
    before = time.time()
    cache.set("default", b"1")
    cache.set("short", b"2", ttl=0.2)
    cache.set("forever", b"3", ttl=math.inf)
    cache.set("gone", b"4", ttl=50)
    clock.advance(60)
    assert cache.get("gone") is None  # expired on the cache's clock, so removed from disk as well
    cache.close()

    stored = rows(path)
    assert set(stored) == {"default", "short", "forever"}
    assert stored["forever"][1] is None
    assert before + 100 <= stored["default"][1] <= time.time() + 100
    time.sleep(0.25)

    clock = FakeClock(now=3.0)
    with MemoryCache(path=path, clock=clock) as cache:
        assert cache.keys() == ["default", "forever"]  # short expired while the cache was closed
        assert "short" not in rows(path)
        clock.advance(99)
        assert cache.get("default") == b"1"
        clock.advance(1)
        assert cache.get("default") is None
        assert cache.get("forever") == b"3"


def test_refused_files(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="garbage.db"):
        MemoryCache(path=garbage)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="another program"):
        MemoryCache(path=other)


# -- threads ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("persisted", [False, True], ids=["memory", "sqlite"])
def test_concurrent_access_from_eight_threads(tmp_path, persisted):
    cache = MemoryCache(max_entries=20, max_bytes=2000, path=tmp_path / "c.db" if persisted else None)
    keys = [f"key-{i}" for i in range(40)]
    ops = 300 if persisted else 2000
    gets = [0] * 8
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        rng = random.Random(n)
        try:
            start.wait()
            for i in range(ops):
                key = rng.choice(keys)
                roll = rng.random()
                if roll < 0.45:
                    cache.set(key, f"{key}|{n}|{i}".encode() * rng.randint(1, 4))
                elif roll < 0.9:
                    gets[n] += 1
                    value = cache.get(key)
                    assert value is None or value.startswith(f"{key}|".encode())
                else:
                    cache.delete(key)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    assert stats["evictions"] > 0
    stored = cache.keys()
    present = {k: cache.get(k) for k in stored}
    assert stats["entries"] == len(present) <= 20
    assert stats["bytes"] == sum(size(k, v) for k, v in present.items()) <= 2000
    cache.close()
    if persisted:
        with MemoryCache(max_entries=20, max_bytes=2000, path=tmp_path / "c.db") as reopened:
            stored = reopened.keys()
            assert {k: reopened.get(k) for k in stored} == present


# -- keys ---------------------------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_sensitive_to_every_input():
    base = ("model-a", "v1", [1, 2, 3], {"temperature": 0.0, "max_tokens": 16, "stop": ["\n"]})
    key = cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(*base) == key
    assert cache_key("model-a", "v1", [1, 2, 3], {"stop": ["\n"], "max_tokens": 16, "temperature": 0}) == key
    variants = [
        ("model-b", "v1", [1, 2, 3], base[3]),
        ("model-a", "v2", [1, 2, 3], base[3]),
        ("model-a", "v1", [1, 2, 4], base[3]),
        ("model-a", "v1", [3, 2, 1], base[3]),
        ("model-a", "v1", [1, 2, 3, 0], base[3]),
        ("model-a", "v1", [1, 2, 3], {**base[3], "temperature": 0.5}),
        ("model-a", "v1", [1, 2, 3], {**base[3], "max_tokens": 17}),
        ("model-a", "v1", [1, 2, 3], {**base[3], "stop": ["\n", "."]}),
        ("model-a", "v1", [1, 2, 3], {**base[3], "seed": 7}),
    ]
    keys = {cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    with pytest.raises(ValueError):
        cache_key("m", "v", [1], {"top_p": math.nan})
    with pytest.raises(TypeError):
        cache_key("m", "v", [1], {"x": object()})


def test_is_cacheable():
    assert is_cacheable(0.0, None)
    assert is_cacheable(0, 42)
    assert is_cacheable(0.7, 0)
    assert is_cacheable(1.0, 1234)
    assert not is_cacheable(0.7, None)
    assert not is_cacheable(1e-6, None)


# -- make_cache ---------------------------------------------------------------------------------------------------


def test_make_cache_dispatch(tmp_path):
    for spec in (None, "memory", ""):
        cache = make_cache(spec, max_entries=7)
        assert isinstance(cache, MemoryCache) and cache.path is None and cache.max_entries == 7
        cache.close()
    absolute = tmp_path / "a.db"
    with make_cache(f"sqlite:///{absolute}", max_bytes=1000) as cache:
        assert isinstance(cache, MemoryCache) and cache.path == str(absolute) and cache.max_bytes == 1000
        cache.set("k", b"v")
    assert set(rows(absolute)) == {"k"}
    for name in ("b.sqlite", "c.sqlite3", "d.DB"):
        with make_cache(str(tmp_path / name)) as cache:
            assert isinstance(cache, MemoryCache) and cache.path == str(tmp_path / name)


def test_make_cache_errors(tmp_path, monkeypatch):
    for spec in ("memcached://host:11211", "cache.txt", str(tmp_path / "folder"), "sqlite:///", "sqlite://x.db"):
        with pytest.raises(ValueError):
            make_cache(spec)
    with pytest.raises(TypeError):
        make_cache("memory", max_things=3)
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the package were not installed
    with pytest.raises(ValueError, match="pip install redis"):
        make_cache("redis://localhost:6379/0")
    with pytest.raises(ValueError, match="pip install redis"):
        RedisCache("rediss://localhost:6379/0")


# -- Redis --------------------------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


class TestRedisCache:
    def test_get_set_delete_exists_and_stats(self, redis_url, prefix):
        with RedisCache(redis_url, prefix=prefix) as cache:
            assert isinstance(cache, CacheBackend)
            assert cache.get("a") is None
            cache.set("a", b"\x00binary\xff")
            cache.set("b", b"")
            assert cache.get("a") == b"\x00binary\xff"
            assert cache.get("b") == b""
            assert cache.exists("a") and not cache.exists("c")
            cache.set("a", b"new")
            assert cache.get("a") == b"new"
            assert cache.delete("a") is True
            assert cache.delete("a") is False
            stats = cache.stats()
            assert stats["backend"] == "redis"
            assert (stats["entries"], stats["bytes"], stats["hits"], stats["misses"]) == (1, 1, 3, 1)
            cache.clear()
            assert cache.stats()["entries"] == 0 and not cache.exists("b")
            with pytest.raises(ValueError):
                cache.set("x", b"v", ttl=0)

    def test_ttl(self, redis_url, prefix):
        with RedisCache(redis_url, prefix=prefix, default_ttl=30) as cache:
            cache.set("default", b"1")
            cache.set("short", b"2", ttl=0.1)
            cache.set("forever", b"3", ttl=math.inf)
            raw = cache._client
            assert 29_000 < raw.pttl(prefix + "default") <= 30_000
            assert raw.pttl(prefix + "forever") == -1  # no expiry
            assert cache.get("short") == b"2"
            time.sleep(0.2)
            assert cache.get("short") is None and not cache.exists("short")
            assert cache.get("default") == b"1"

    def test_two_instances_share_entries(self, redis_url, prefix):
        with RedisCache(redis_url, prefix=prefix) as first, make_cache(redis_url, prefix=prefix, max_bytes=1) as second:
            assert isinstance(second, RedisCache)
            first.set("shared", b"from the first gateway")
            assert second.get("shared") == b"from the first gateway"
            second.delete("shared")
            assert not first.exists("shared")
            with RedisCache(redis_url, prefix=f"other:{prefix}") as isolated:
                first.set("k", b"v")
                assert isolated.get("k") is None and isolated.stats()["entries"] == 0
            assert first.stats()["entries"] == second.stats()["entries"] == 1

    def test_max_entries_evicts_least_recently_used(self, redis_url, prefix):
        with RedisCache(redis_url, prefix=prefix, max_entries=3) as cache:
            for key in "abc":
                cache.set(key, key.encode())
            assert cache.get("a") == b"a"  # refreshes a
            cache.set("d", b"d")  # b goes
            assert [k for k in "abcd" if cache.exists(k)] == ["a", "c", "d"]
            assert cache.stats()["evictions"] == 1 and cache.stats()["entries"] == 3
            assert cache.delete("c") is True
            cache.clear()
            assert not cache._client.exists(cache._index)

    def test_unreachable_server(self, redis_url):
        with pytest.raises(ConnectionError, match="cannot reach") as info:
            RedisCache(f"redis://:secret@127.0.0.1:{free_port()}/0", socket_timeout=0.5)
        assert "secret" not in str(info.value)  # the password is not echoed


def test_persisted_cache_file_is_private(tmp_path):
    import stat

    from fleetserve.gateway.cache import make_cache

    path = tmp_path / "state" / "answers.sqlite"
    cache = make_cache(str(path), max_entries=10, max_bytes=2**20)
    cache.set("k", b"v", None)
    cache.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
