"""KV block pool: allocation, freeing, prefix hashes, LRU reuse and eviction (no model)."""

from fleetserve.contract import block_hashes, hash_block
from fleetserve.engine.kv_cache import KVCacheManager


def test_block_hashes_chain_and_ignore_partial_block():
    hashes = block_hashes(list(range(10)), 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(0, [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    # the same tokens after another prefix get another key
    assert block_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != hashes[1]


def test_hash_is_stable_across_processes():
    # A fixed value: the gateway computes these keys in another process and must agree.
    assert hash_block(0, [1, 2, 3]) == hash_block(0, [1, 2, 3])
    assert isinstance(hash_block(0, [1]), int) and 0 <= hash_block(0, [1]) < 2**64


def test_allocate_and_free_counts():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.lookup_prefix("a", list(range(10))) == 0
    assert kv.allocate("a", 10)
    assert len(kv.block_table("a")) == 3
    assert kv.num_free_blocks == 5
    assert kv.allocate("a", 12)  # still fits in 3 blocks
    assert len(kv.block_table("a")) == 3
    assert kv.allocate("a", 13)
    assert len(kv.block_table("a")) == 4
    kv.free("a")
    assert kv.num_free_blocks == 8
    assert kv.stats().used_blocks == 0


def test_allocate_refuses_without_changing_anything():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.lookup_prefix("a", [1, 2, 3])
    assert not kv.allocate("a", 9)  # needs 3 blocks
    assert kv.num_free_blocks == 2
    assert kv.block_table("a") == []


def test_prefix_hit_after_free_and_at_least_one_token_left():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 112))  # exactly 3 blocks
    kv.lookup_prefix("a", tokens)
    kv.allocate("a", 12)
    kv.commit_full_blocks("a", tokens, 12)
    table_a = list(kv.block_table("a"))
    kv.free("a")
    assert kv.stats().cached_blocks == 3
    # A second request with the same 12 tokens reuses 2 blocks: the last token must still be computed.
    assert kv.lookup_prefix("b", tokens) == 8
    assert kv.block_table("b") == table_a[:2]
    # A longer prompt sharing the prefix reuses all three.
    assert kv.lookup_prefix("c", tokens + [7, 8]) == 12
    assert kv.stats().prefix_hits == 5


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    kv.lookup_prefix("a", tokens)
    kv.allocate("a", 5)
    kv.commit_full_blocks("a", tokens, 5)
    assert kv.lookup_prefix("b", tokens) == 4  # shares a's two full blocks while a still runs
    kv.allocate("b", 5)
    assert kv.num_free_blocks == 0  # 3 for a, 1 more for b's tail
    kv.free("a")
    assert kv.num_free_blocks == 1  # the shared blocks are still owned by b
    kv.free("b")
    assert kv.num_free_blocks == 4


def test_lru_eviction_reuses_oldest_and_unkeyed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    for rid, toks in (("old", old), ("new", new)):
        kv.lookup_prefix(rid, toks)
        kv.allocate(rid, 4)
        kv.commit_full_blocks(rid, toks, 4)
        kv.free(rid)
    assert kv.stats().cached_blocks == 4
    # Taking two blocks evicts the least recently freed prefix ("old"), not "new".
    kv.lookup_prefix("x", [9, 9, 9])
    kv.allocate("x", 4)
    assert kv.lookup_prefix("n", new + [0]) == 4
    assert kv.lookup_prefix("o", old + [0]) == 0


def test_tail_blocks_are_evicted_before_head_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    toks = [1, 2, 3, 4, 5, 6]
    kv.lookup_prefix("a", toks)
    kv.allocate("a", 6)
    kv.commit_full_blocks("a", toks, 6)
    kv.free("a")
    kv.lookup_prefix("x", [0])
    kv.allocate("x", 2)  # one block: the tail of "a" goes
    assert kv.lookup_prefix("b", toks + [7]) == 4


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    kv.lookup_prefix("a", [1, 2, 3])
    kv.allocate("a", 3)
    kv.commit_full_blocks("a", [1, 2, 3], 3)
    kv.free("a")
    assert kv.lookup_prefix("b", [1, 2, 3]) == 0
    assert kv.stats().cached_blocks == 0


def test_cached_count_matches_a_scan_through_random_use():
    import random

    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=12, block_size=2)
    live: dict[str, list[int]] = {}
    for step in range(400):
        if live and (rng.random() < 0.4 or len(live) > 4):
            victim = rng.choice(sorted(live))
            del live[victim]
            kv.free(victim)
            continue
        rid = f"r{step}"
        tokens = [rng.randrange(3) for _ in range(rng.randrange(2, 9))]  # few distinct tokens: many prefix hits
        kv.lookup_prefix(rid, tokens)
        if kv.allocate(rid, len(tokens)):
            kv.commit_full_blocks(rid, tokens, len(tokens))
            live[rid] = tokens
        else:
            kv.free(rid)
        scan = sum(1 for b in kv._free if kv._block_hash[b] is not None)
        assert kv.stats().cached_blocks == scan
