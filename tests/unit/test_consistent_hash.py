"""Consistent hashing: the ring's stability under membership changes, and the policy's keys and fallback."""

from collections import Counter

import pytest

from fleetserve.gateway.policies import make_policy
from fleetserve.gateway.policies.base import RouteRequest
from fleetserve.gateway.policies.consistent_hash import ConsistentHashPolicy, HashRing, ring_hash
from fleetserve.gateway.registry import WorkerRecord
from fleetserve.protocol import fleet_pb2 as pb

KEYS = [f"key-{i}" for i in range(10_000)]
NODES = [f"w{i}" for i in range(10)]


def worker(name, block_size=16):
    return WorkerRecord(
        worker_id=name,
        info=pb.WorkerInfo(name=name, kv_blocks_total=100, block_size=block_size),
        registered_at=0,
        last_heartbeat=0,
        stats=pb.WorkerStats(kv_blocks_total=100),
    )


def request(tokens=(), affinity=None):
    return RouteRequest(model="m", prompt_token_ids=list(tokens), affinity_key=affinity)


def assignment(ring):
    return {key: ring.owner(key) for key in KEYS}


# -- HashRing ----------------------------------------------------------------------------------------------


def test_ring_hash_is_stable_across_processes():
    # Not Python's salted hash(): a fixed value, the same in every gateway.
    assert ring_hash("w1#0") == ring_hash("w1#0")
    assert ring_hash("abc") == int.from_bytes(__import__("hashlib").blake2b(b"abc", digest_size=8).digest(), "big")


def test_same_key_always_same_node_whatever_the_order_nodes_were_added():
    ring = HashRing(NODES)
    other = HashRing(list(reversed(NODES)))
    assert ring.nodes == sorted(NODES) and len(ring) == 10
    assert assignment(ring) == assignment(other)
    assert all(ring.owner(k) == ring.owner(k) for k in KEYS[:100])


def test_distribution_is_reasonably_even():
    counts = Counter(assignment(HashRing(NODES)).values())
    assert set(counts) == set(NODES)
    # 1,000 keys each on average; 100 virtual nodes keep every share within a factor of ~1.5.
    assert min(counts.values()) > 600, counts
    assert max(counts.values()) < 1500, counts


def test_removing_a_node_moves_only_its_keys():
    ring = HashRing(NODES)
    before = assignment(ring)
    ring.remove("w3")
    after = assignment(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.05 <= len(moved) / len(KEYS) <= 0.15
    assert all(before[k] == "w3" for k in moved)  # no key owned by a surviving node moved
    assert "w3" not in after.values()
    assert "w3" not in ring.nodes


def test_adding_a_node_moves_keys_only_to_it():
    ring = HashRing(NODES)
    before = assignment(ring)
    ring.add("w10")
    after = assignment(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "w10" for k in moved)
    assert 0.04 <= len(moved) / len(KEYS) <= 0.15
    ring.add("w10")  # adding twice changes nothing
    assert assignment(ring) == after


def test_owners_walks_every_node_once_clockwise_from_the_owner():
    ring = HashRing(NODES)
    for key in KEYS[:50]:
        order = list(ring.owners(key))
        assert order[0] == ring.owner(key)
        assert sorted(order) == sorted(NODES)
    # The next owner is where the key goes when its owner leaves.
    for key in KEYS[:200]:
        first, second = list(ring.owners(key))[:2]
        smaller = HashRing(NODES)
        smaller.remove(first)
        assert smaller.owner(key) == second


def test_empty_ring():
    ring = HashRing()
    assert ring.owner("k") is None and list(ring.owners("k")) == []
    ring.remove("missing")
    with pytest.raises(ValueError):
        HashRing(vnodes=0)


def test_vnodes_setting():
    ring = HashRing(["a", "b"], vnodes=7)
    assert len(ring._points) == 14
    ring.remove("a")
    assert len(ring._points) == 7


# -- ConsistentHashPolicy ----------------------------------------------------------------------------------


def test_same_key_same_worker_and_keys_spread():
    workers = [worker(n) for n in NODES]
    policy = ConsistentHashPolicy()
    seen = Counter()
    for i in range(500):
        req = request(affinity=f"user-{i}")
        chosen = policy.pick(workers, req)
        assert policy.pick(list(reversed(workers)), request(affinity=f"user-{i}")) is chosen
        seen[chosen.worker_id] += 1
    assert len(seen) == 10


def test_owner_down_goes_to_the_next_node_on_the_ring_and_comes_back():
    workers = {n: worker(n) for n in NODES}
    policy = ConsistentHashPolicy()
    policy.pick(list(workers.values()), request(affinity="warm-up"))
    for i in range(100):
        key = f"user-{i}"
        owner, fallback = list(policy.ring.owners(key))[:2]
        assert policy.pick(list(workers.values()), request(affinity=key)).worker_id == owner
        healthy = [w for n, w in workers.items() if n != owner]
        assert policy.pick(healthy, request(affinity=key)).worker_id == fallback
        # The owner stays on the ring while it is only missing from the candidates: it gets its keys back.
        assert policy.pick(list(workers.values()), request(affinity=key)).worker_id == owner
    assert policy.describe()["fallbacks"] == 100


def test_a_missing_worker_moves_only_its_own_keys():
    workers = [worker(n) for n in NODES]
    policy = ConsistentHashPolicy()
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: policy.pick(workers, request(affinity=k)).worker_id for k in keys}
    survivors = [w for w in workers if w.worker_id != "w5"]
    after = {k: policy.pick(survivors, request(affinity=k)).worker_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "w5" for k in moved)


def test_forget_removes_the_node_from_the_ring():
    workers = [worker(n) for n in NODES[:3]]
    policy = ConsistentHashPolicy()
    policy.pick(workers, request(affinity="x"))
    assert policy.describe()["ring_size"] == 3
    policy.forget("w1")
    assert policy.describe()["ring_size"] == 2 and "w1" not in policy.ring.nodes
    # A worker that shows up again among the candidates joins the ring again.
    policy.pick(workers, request(affinity="x"))
    assert policy.describe()["ring_size"] == 3


def test_key_choice():
    policy = ConsistentHashPolicy()
    workers = [worker("a")]
    assert policy.key(request(list(range(40)), affinity="alice"), workers) == "alice"
    tokens = list(range(40))
    first_block = request(tokens).block_hashes(16)[0]
    assert policy.key(request(tokens), workers) == f"{first_block:016x}"
    # Same first block, different rest: same key, so shared prefixes meet on one worker.
    assert policy.key(request(list(range(16)) + [99, 98, 97]), workers) == policy.key(request(tokens), workers)
    assert policy.key(request([5, 6, 7]), workers) == str([5, 6, 7])
    # The candidates' block size decides the first block.
    big = [worker("b", block_size=32)]
    assert policy.key(request(list(range(20))), big) == str(list(range(20)))
    assert ConsistentHashPolicy(block_size=8).key(request(list(range(8))), big) != str(list(range(8)))


def test_shared_prefix_requests_meet_on_one_worker():
    workers = [worker(n) for n in NODES]
    policy = ConsistentHashPolicy()
    system = list(range(100, 132))
    chosen = {policy.pick(workers, request(system + [i, i + 1])).worker_id for i in range(50)}
    assert len(chosen) == 1
    spread = {policy.pick(workers, request([i] * 16)).worker_id for i in range(200)}
    assert len(spread) >= 8


def test_made_by_name():
    policy = make_policy("consistent-hash", vnodes=20)
    assert isinstance(policy, ConsistentHashPolicy) and policy.ring.vnodes == 20
    assert policy.describe() == {
        "name": "consistent-hash",
        "vnodes": 20,
        "ring_size": 0,
        "ring_nodes": [],
        "picks": 0,
        "fallbacks": 0,
    }
