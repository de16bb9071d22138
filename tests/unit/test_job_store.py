"""The polling jobs' stores: this gateway's memory (bounded), and Redis shared by gateways with leases that only
their holder renews or releases, and that lapse when it stops renewing."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fleetserve.gateway.job_store import JobStoreError, MemoryJobStore, RedisJobStore, make_job_store


def test_memory_store_keeps_the_latest_jobs_and_every_lease_is_its_own():
    async def main():
        store = MemoryJobStore(keep=2)
        for i in range(3):
            await store.save(f"k:{i}", {"request_id": str(i), "status": "queued"})
        assert await store.load("k:0") is None and (await store.load("k:2"))["request_id"] == "2"
        await store.save("k:1", {"request_id": "1", "status": "completed"})  # a reused id is the newest again
        await store.save("k:3", {"request_id": "3", "status": "queued"})
        assert await store.load("k:2") is None and (await store.load("k:1"))["status"] == "completed"
        assert await store.claim("k:1") and await store.renew("k:1") and not store.shared

    asyncio.run(main())


def test_redis_leases_belong_to_one_gateway_and_lapse(redis_url):
    async def main():
        prefix = f"test:{uuid.uuid4().hex}:"
        one = RedisJobStore(redis_url, prefix=prefix, lease_s=0.3, owner="one")
        two = RedisJobStore(redis_url, prefix=prefix, lease_s=0.3, owner="two")
        await one.save("k:a", {"request_id": "a", "status": "running", "request": {"body": {}, "tag": "k"}})
        assert (await two.load("k:a"))["status"] == "running" and await two.load("k:none") is None
        assert await one.claim("k:a") and not await two.claim("k:a")
        assert not await two.renew("k:a") and await one.renew("k:a")
        await two.release("k:a")  # not its lease: nothing happens
        assert not await two.claim("k:a")
        await asyncio.sleep(0.5)  # one stopped renewing (its gateway died): the lease lapses
        assert await two.claim("k:a") and not await one.renew("k:a")
        await two.release("k:a")
        assert await one.claim("k:a")
        for store in (one, two):
            await store.close()

    asyncio.run(main())


def test_an_unreachable_store_is_a_clear_503_and_bad_urls_are_refused(redis_url):
    from fleetserve.bench.local_fleet import free_port

    async def main():
        store = RedisJobStore(f"redis://:secret@127.0.0.1:{free_port()}/0")
        with pytest.raises(JobStoreError, match="cannot be reached") as info:
            await store.load("k:a")
        assert "secret" not in str(info.value)
        await store.close()

    asyncio.run(main())
    assert isinstance(make_job_store(""), MemoryJobStore) and isinstance(make_job_store("memory"), MemoryJobStore)
    with pytest.raises(ValueError, match="unknown job store"):
        make_job_store("postgres://x")
