"""Where polling jobs (``POST /v1/requests``) are kept: in this gateway's memory, or in Redis, where every gateway
sharing it finds them.

A job is JSON: its request id, status (``queued``, ``running``, ``completed``, ``failed``), creation time, model,
and its result or error once finished. In a shared store it also holds what is needed to run it again: the request
body and the namespace (API key tag) it was made in. The gateway running a job holds its *lease*, a Redis key
with a short expiry that it renews while it runs; when a gateway dies its leases lapse, and the next gateway asked
about one of its unfinished jobs claims the lease and runs the job again from its request (a greedy or seeded
answer comes out the same). A lease is claimed with ``SET NX``, so two gateways never both take a job over.

Finished jobs stay ``keep_s`` (an hour) in Redis; a memory store keeps the latest ``keep`` (1,000).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from typing import Any

from fleetserve.errors import CapacityError
from fleetserve.gateway.cache.redis_store import redact_url

log = logging.getLogger(__name__)

JOB_KEEP = 1000
"""Jobs a memory store keeps (the oldest go first)."""
JOB_KEEP_S = 3600.0
"""Seconds a job stays in a shared store after its last change."""
LEASE_S = 10.0
"""Seconds a job's lease lasts unless its gateway renews it (it does every third of that)."""
FINISHED = ("completed", "failed")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobStoreError(CapacityError):
    """The shared job store cannot be reached (HTTP 503: retry shortly)."""


class MemoryJobStore:
    """This gateway's own jobs, the latest ``keep``; nobody else can run them, so every lease is its own."""

    shared = False

    def __init__(self, keep: int = JOB_KEEP):
        self.keep = keep
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def save(self, key: str, job: dict[str, Any]) -> None:
        self._jobs.pop(key, None)  # a reused id moves to the end, as the newest
        self._jobs[key] = job
        while len(self._jobs) > self.keep:
            self._jobs.popitem(last=False)

    async def load(self, key: str) -> dict[str, Any] | None:
        return self._jobs.get(key)

    async def claim(self, key: str) -> bool:
        return True

    async def renew(self, key: str) -> bool:
        return True

    async def release(self, key: str) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisJobStore:
    """Jobs in a Redis server, shared by every gateway given the same URL and prefix; leases as described above."""

    shared = True

    def __init__(
        self,
        url: str,
        prefix: str = "fleetserve:jobs:",
        keep_s: float = JOB_KEEP_S,
        lease_s: float = LEASE_S,
        owner: str | None = None,
    ):
        try:
            import redis.asyncio as redis_asyncio
        except ImportError:
            raise ValueError("a Redis job store needs the redis package: pip install redis") from None
        self.url = redact_url(url)
        self.prefix = prefix
        self.keep_s = keep_s
        self.lease_s = lease_s
        self.owner = owner or f"gateway-{uuid.uuid4().hex}"
        """This gateway's name on the leases it holds."""
        try:
            self._client = redis_asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as exc:
            raise ValueError(f"bad job store URL {self.url!r}: {exc}") from None
        self._errors = (redis_asyncio.RedisError, OSError)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _lease(self, key: str) -> str:
        return self.prefix + key + "\0lease"

    async def _call(self, what: str, coroutine):
        try:
            return await coroutine
        except self._errors as exc:
            log.warning("job store %s: %s failed: %s", self.url, what, exc)
            raise JobStoreError("The shared job store cannot be reached; retry shortly.") from None

    async def save(self, key: str, job: dict[str, Any]) -> None:
        await self._call("save", self._client.set(self._key(key), json.dumps(job), px=int(self.keep_s * 1000)))

    async def load(self, key: str) -> dict[str, Any] | None:
        raw = await self._call("load", self._client.get(self._key(key)))
        return json.loads(raw) if raw else None

    async def claim(self, key: str) -> bool:
        """Take the job's lease when nobody holds it (its gateway finished or died)."""
        px = int(self.lease_s * 1000)
        return bool(await self._call("claim", self._client.set(self._lease(key), self.owner, nx=True, px=px)))

    async def renew(self, key: str) -> bool:
        """Extend this gateway's lease; False when it no longer holds it."""
        px = str(int(self.lease_s * 1000))
        return bool(await self._call("renew", self._client.eval(_RENEW, 1, self._lease(key), self.owner, px)))

    async def release(self, key: str) -> None:
        await self._call("release", self._client.eval(_RELEASE, 1, self._lease(key), self.owner))

    async def close(self) -> None:
        await self._client.aclose()


def make_job_store(url: str, lease_s: float = LEASE_S) -> MemoryJobStore | RedisJobStore:
    """``""`` or ``memory``: this gateway's memory; ``redis://`` or ``rediss://``: a shared Redis store."""
    spec = url.strip()
    if spec in ("", "memory"):
        return MemoryJobStore()
    if spec.split("://", 1)[0].lower() in ("redis", "rediss"):
        return RedisJobStore(spec, lease_s=lease_s)
    raise ValueError(f"unknown job store {redact_url(spec)!r}: use memory, redis:// or rediss://")
