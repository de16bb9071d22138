"""The consistent-hash policy and its hash ring: a key always goes to the same worker; fleet changes move few keys.

The ring places ``vnodes`` points per worker (100 by default) at the 64-bit BLAKE2b hashes of ``"<id>#<i>"``; a
key belongs to the first point clockwise from the key's own hash. Many points per worker even out the shares,
and adding or removing a worker moves only the keys between its points and their predecessors: about 1/N of
them, and only to or from that worker. BLAKE2b rather than Python's ``hash()``, which is salted per process,
so every gateway computes the same ring.

The key of a request, in order of preference:

* ``request.affinity_key``: the client's ``user`` field or session header, so one user's conversation stays on
  the worker that holds its growing prefix;
* the hash of the prompt's first full block (in hex): requests sharing a start (a system prompt, a few-shot
  preamble) meet on one worker, which then has that prefix cached;
* the prompt itself, when it is shorter than one block.

Fallback: the policy keeps on its ring every worker it has seen, not only the current candidates. When a key's
owner is not among the candidates (down, draining, or without room) the key goes to the next worker clockwise
that is, so only the missing worker's keys move, and they come back when it does. A worker that left the fleet
for good is taken off the ring by :meth:`ConsistentHashPolicy.forget`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from fleetserve.gateway.policies.base import Policy, RouteRequest

if TYPE_CHECKING:
    from fleetserve.gateway.registry import WorkerRecord

DEFAULT_VNODES = 100


def ring_hash(value: str) -> int:
    """A stable 64-bit position on the ring."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Nodes on a hash ring, each at ``vnodes`` points."""

    def __init__(self, nodes: Sequence[str] = (), vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self._nodes: set[str] = set()
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def add(self, node_id: str) -> None:
        if node_id in self._nodes:
            return
        self._nodes.add(node_id)
        for i in range(self.vnodes):
            point = ring_hash(f"{node_id}#{i}")
            at = bisect.bisect_left(self._points, point)
            # Equal points (a 64-bit collision) are ordered by node id, so the ring does not depend on the order
            # in which nodes were added.
            while at < len(self._points) and self._points[at] == point and self._owners[at] < node_id:
                at += 1
            self._points.insert(at, point)
            self._owners.insert(at, node_id)

    def remove(self, node_id: str) -> None:
        if node_id not in self._nodes:
            return
        self._nodes.discard(node_id)
        keep = [i for i, owner in enumerate(self._owners) if owner != node_id]
        self._points = [self._points[i] for i in keep]
        self._owners = [self._owners[i] for i in keep]

    def owners(self, key: str) -> Iterator[str]:
        """Every node once, clockwise from the key's position: the owner first, then its fallbacks in order."""
        if not self._points:
            return
        start = bisect.bisect_right(self._points, ring_hash(key))
        seen: set[str] = set()
        count = len(self._points)
        for step in range(count):
            node = self._owners[(start + step) % count]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self._nodes):
                    return

    def owner(self, key: str) -> str | None:
        """The node that owns ``key`` (None on an empty ring)."""
        return next(self.owners(key), None)


class ConsistentHashPolicy(Policy):
    """Sticky routing by request key on a hash ring of every worker seen (see the module docstring).

    ``block_size`` is the block size used to hash the prompt's first block; None means the smallest block size
    among the candidates (16 for workers that report none)."""

    name = "consistent-hash"

    def __init__(self, vnodes: int = DEFAULT_VNODES, block_size: int | None = None) -> None:
        if block_size is not None and block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.ring = HashRing(vnodes=vnodes)
        self.block_size = block_size
        self.picks = 0
        self.fallbacks = 0
        """Picks that went past the key's owner because it was not among the candidates."""

    def key(self, request: RouteRequest, candidates: Sequence[WorkerRecord] = ()) -> str:
        if request.affinity_key:
            return request.affinity_key
        block_size = self.block_size or min((w.info.block_size or 16 for w in candidates), default=16)
        hashes = request.block_hashes(block_size)
        if hashes:
            return f"{hashes[0]:016x}"
        return str(list(request.prompt_token_ids))

    def pick(self, candidates: Sequence[WorkerRecord], request: RouteRequest) -> WorkerRecord | None:
        self.picks += 1
        by_id = {w.worker_id: w for w in candidates}
        for worker_id in sorted(by_id):
            self.ring.add(worker_id)
        for rank, worker_id in enumerate(self.ring.owners(self.key(request, candidates))):
            if worker_id in by_id:
                if rank:
                    self.fallbacks += 1
                return by_id[worker_id]
        return None  # unreachable: every candidate is on the ring

    def forget(self, worker_id: str) -> None:
        self.ring.remove(worker_id)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "vnodes": self.ring.vnodes,
            "ring_size": len(self.ring),
            "ring_nodes": self.ring.nodes,
            "picks": self.picks,
            "fallbacks": self.fallbacks,
        }
