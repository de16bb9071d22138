"""Balancing policies against stub workers: real WorkerRecords with no channel, no model, no network."""

from collections import Counter

import pytest

from fleetserve.gateway.policies import (
    DEFAULT_POLICY,
    POLICIES,
    KVAwarePolicy,
    LeastConnectionsPolicy,
    LeastLatencyPolicy,
    PowerOfTwoPolicy,
    PrefixAwarePolicy,
    RandomPolicy,
    RoundRobinPolicy,
    WeightedPolicy,
    make_policy,
)
from fleetserve.gateway.policies.base import RouteRequest, kv_use, load
from fleetserve.gateway.registry import WorkerRecord
from fleetserve.protocol import fleet_pb2 as pb


def worker(
    name,
    *,
    in_flight=0,
    running=0,
    kv_used=0,
    kv_total=100,
    hashes=(),
    ttft=0.0,
    itl=0.0,
    block_size=16,
    max_num_seqs=64,
):
    return WorkerRecord(
        worker_id=name,
        info=pb.WorkerInfo(name=name, kv_blocks_total=kv_total, block_size=block_size, max_num_seqs=max_num_seqs),
        registered_at=0,
        last_heartbeat=0,
        stats=pb.WorkerStats(running=running, kv_blocks_total=kv_total, kv_blocks_used=kv_used),
        recent_first_token_s=ttft,
        recent_inter_token_s=itl,
        in_flight=in_flight,
        block_hashes=set(hashes),
    )


def fleet(n=4, **kw):
    return [worker(f"w{i}", **kw) for i in range(n)]


def prompt(seed, blocks=4, block_size=16, tail=5):
    """Token ids: ``blocks`` full blocks determined by ``seed``, then a partial block."""
    return [seed * 1000 + i for i in range(blocks * block_size)] + list(range(tail))


def request(tokens=(), **kw):
    return RouteRequest(model="m", prompt_token_ids=list(tokens), **kw)


def dispatch(policy, workers, req):
    """What admission does with a pick: count the request in flight, then tell the policy."""
    chosen = policy.pick(workers, req)
    if chosen is not None:
        chosen.in_flight += 1
        policy.on_dispatch(chosen, req)
    return chosen


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# -- round-robin, random, least-connections ---------------------------------------------------------------


def test_round_robin_cycles_in_id_order_and_spread_stays_within_one():
    workers = fleet(3)
    policy = RoundRobinPolicy()
    first = [policy.pick(list(reversed(workers)), request()).worker_id for _ in range(6)]
    assert first == ["w0", "w1", "w2", "w0", "w1", "w2"]
    counts = Counter()
    for n in range(1, 301):
        counts[policy.pick(workers, request()).worker_id] += 1
        assert max(counts.values()) - min(counts[w.worker_id] for w in workers) <= 1, n


def test_round_robin_continues_when_a_worker_leaves():
    workers = fleet(3)
    policy = RoundRobinPolicy()
    assert policy.pick(workers, request()).worker_id == "w0"
    assert policy.pick([workers[0], workers[2]], request()).worker_id == "w2"
    assert policy.pick(workers, request()).worker_id == "w0"


def test_random_reaches_every_worker_and_is_reproducible_with_a_seed():
    workers = fleet(5)
    policy = RandomPolicy(seed=7)
    picks = [policy.pick(workers, request()).worker_id for _ in range(500)]
    again = RandomPolicy(seed=7)
    assert [again.pick(list(reversed(workers)), request()).worker_id for _ in range(500)] == picks
    counts = Counter(picks)
    assert set(counts) == {w.worker_id for w in workers}
    assert min(counts.values()) > 50  # uniform: about 100 each
    other = RandomPolicy(seed=8)
    assert [other.pick(workers, request()).worker_id for _ in range(500)] != picks


def test_least_connections_avoids_the_loaded_worker_and_spreads_ties():
    workers = [worker("a", in_flight=5), worker("b", in_flight=1), worker("c", in_flight=1)]
    policy = LeastConnectionsPolicy()
    picks = [policy.pick(workers, request()).worker_id for _ in range(10)]
    assert "a" not in picks
    assert set(picks) == {"b", "c"}
    # A heartbeat's running count is up to a second old: the gateway's own in-flight count decides.
    assert policy.pick([worker("x", running=9), worker("y", in_flight=2)], request()).worker_id == "x"


def test_least_connections_balances_when_requests_accumulate():
    workers = fleet(4)
    policy = LeastConnectionsPolicy()
    for _ in range(40):
        dispatch(policy, workers, request())
    assert [w.in_flight for w in workers] == [10, 10, 10, 10]


# -- least-latency -----------------------------------------------------------------------------------------


def test_least_latency_prefers_the_faster_worker():
    slow = worker("slow", ttft=0.5, itl=0.05)
    fast = worker("fast", ttft=0.1, itl=0.01)
    policy = LeastLatencyPolicy()
    assert [policy.pick([slow, fast], request()).worker_id for _ in range(5)] == ["fast"] * 5


def test_least_latency_scales_by_load():
    slow = worker("slow", ttft=0.2, itl=0.02)
    fast = worker("fast", ttft=0.1, itl=0.01, in_flight=3)  # twice as fast, but four times as loaded
    assert LeastLatencyPolicy().pick([slow, fast], request()).worker_id == "slow"


def test_least_latency_tries_unmeasured_workers_first():
    fast = worker("fast", ttft=0.01, itl=0.001)
    new = worker("new")
    policy = LeastLatencyPolicy()
    assert policy.pick([fast, new], request()).worker_id == "new"
    # Once it has a request in flight, it is scored as an average worker instead of flooded.
    new.in_flight = 1
    assert policy.pick([fast, new], request()).worker_id == "fast"
    assert policy.describe()["exploration_picks"] == 1


def test_least_latency_spreads_ties():
    workers = [worker(f"w{i}", ttft=0.1, itl=0.01) for i in range(3)]
    policy = LeastLatencyPolicy()
    assert {policy.pick(workers, request()).worker_id for _ in range(3)} == {"w0", "w1", "w2"}


# -- weighted ----------------------------------------------------------------------------------------------


def test_weighted_shares_are_proportional_to_capacity():
    workers = [worker("big", kv_total=300), worker("mid", kv_total=200), worker("small", kv_total=100)]
    policy = WeightedPolicy()
    counts = Counter(policy.pick(workers, request()).worker_id for _ in range(600))
    assert counts == {"big": 300, "mid": 200, "small": 100}
    # Smooth: the big worker never gets a long burst.
    seq = [policy.pick(workers, request()).worker_id for _ in range(6)]
    assert all(seq[i : i + 3] != ["big"] * 3 for i in range(4))


def test_weighted_shares_are_exact_over_each_cycle_with_small_weights():
    workers = [worker("a", kv_total=3), worker("b", kv_total=2), worker("c", kv_total=1)]
    policy = WeightedPolicy()
    for _ in range(10):
        assert Counter(policy.pick(workers, request()).worker_id for _ in range(6)) == {"a": 3, "b": 2, "c": 1}


def test_weighted_is_deterministic():
    workers = [worker("a", kv_total=50), worker("b", kv_total=30)]
    one, two = WeightedPolicy(), WeightedPolicy()
    assert [one.pick(workers, request()).worker_id for _ in range(40)] == [
        two.pick(workers, request()).worker_id for _ in range(40)
    ]


# -- kv-aware ----------------------------------------------------------------------------------------------


def test_kv_aware_avoids_the_loaded_worker():
    busy = worker("busy", in_flight=30, kv_used=50)
    idle = worker("idle", in_flight=2, kv_used=10)
    assert KVAwarePolicy().pick([busy, idle], request()).worker_id == "idle"


def test_kv_aware_weighs_kv_use_against_load():
    full_cache = worker("a", in_flight=0, kv_used=80)
    many_requests = worker("b", in_flight=16, kv_used=10)  # 0.5*16/64 + 0.5*0.1 = 0.175 < 0.5*0.8
    assert KVAwarePolicy().pick([full_cache, many_requests], request()).worker_id == "b"
    only_load = KVAwarePolicy(load_weight=1.0, kv_weight=0.0)
    assert only_load.pick([full_cache, many_requests], request()).worker_id == "a"


def test_kv_aware_uses_max_num_seqs_with_a_default():
    small = worker("small", in_flight=4, max_num_seqs=8)  # half busy
    large = worker("large", in_flight=8, max_num_seqs=0)  # 8 of a default 64
    assert KVAwarePolicy().pick([small, large], request()).worker_id == "large"


def test_kv_aware_refuses_full_workers_and_returns_none_when_all_are_full():
    full = worker("full", kv_used=96)
    roomy = worker("roomy", in_flight=40, kv_used=60)
    policy = KVAwarePolicy()
    assert [policy.pick([full, roomy], request()).worker_id for _ in range(4)] == ["roomy"] * 4
    assert policy.pick([full, worker("also-full", kv_used=95)], request()) is None
    assert policy.describe()["refusals"] == 1
    assert KVAwarePolicy(full_threshold=0.99).pick([full], request()) is full


def test_kv_aware_spreads_ties():
    workers = fleet(3)
    policy = KVAwarePolicy()
    assert {policy.pick(workers, request()).worker_id for _ in range(3)} == {"w0", "w1", "w2"}


# -- power-of-two ------------------------------------------------------------------------------------------


def test_power_of_two_never_picks_the_worse_of_its_pair():
    workers = [
        worker(f"w{i}", in_flight=load_, kv_used=kv)
        for i, (load_, kv) in enumerate([(0, 50), (3, 10), (3, 20), (7, 0), (1, 90), (1, 10)])
    ]
    by_id = {w.worker_id: w for w in workers}
    policy = PowerOfTwoPolicy(seed=3)
    pairs = set()
    for _ in range(400):
        chosen = policy.pick(workers, request())
        a, b = (by_id[i] for i in policy.last_pair)
        assert a is not b and chosen in (a, b)
        other = b if chosen is a else a
        assert (load(chosen), kv_use(chosen)) <= (load(other), kv_use(other))
        pairs.add(frozenset(policy.last_pair))
    assert len(pairs) == 15  # every pair of the six was sampled
    assert "w3" not in {policy.pick(workers, request()).worker_id for _ in range(200)}  # the worst never wins


def test_power_of_two_is_seedable_and_handles_one_candidate():
    workers = fleet(5)
    one, two = PowerOfTwoPolicy(seed=1), PowerOfTwoPolicy(seed=1)
    assert [one.pick(workers, request()).worker_id for _ in range(50)] == [
        two.pick(workers, request()).worker_id for _ in range(50)
    ]
    solo = worker("solo", in_flight=100)
    assert PowerOfTwoPolicy().pick([solo], request()) is solo


# -- prefix-aware ------------------------------------------------------------------------------------------


def hashes_of(tokens, block_size=16, blocks=None):
    found = request(tokens).block_hashes(block_size)
    return found if blocks is None else found[:blocks]


def test_prefix_aware_is_the_default():
    assert DEFAULT_POLICY == "prefix-aware"
    assert isinstance(make_policy(DEFAULT_POLICY), PrefixAwarePolicy)


def test_prefix_aware_follows_reported_block_hashes():
    tokens = prompt(1)
    holder = worker("w2", hashes=hashes_of(tokens))
    workers = [worker("w0"), worker("w1"), holder, worker("w3")]
    policy = PrefixAwarePolicy()
    for _ in range(3):
        req = request(tokens)
        assert policy.pick(workers, req) is holder
        assert req.predicted_cached_tokens == 4 * 16


def test_prefix_aware_prefers_the_longest_consecutive_match():
    tokens = prompt(1)
    full = hashes_of(tokens)
    two = worker("two", hashes=full[:2])
    gap = worker("gap", hashes=[full[0], full[2], full[3]])  # only the first counts: a prefix cannot skip
    three = worker("three", hashes=full[:3], block_size=16)
    req = request(tokens)
    assert PrefixAwarePolicy().pick([two, gap, three], req) is three
    assert req.predicted_cached_tokens == 3 * 16
    req = request(tokens)
    assert PrefixAwarePolicy().pick([two, gap], req) is two
    assert req.predicted_cached_tokens == 2 * 16


def test_prefix_aware_uses_each_workers_block_size():
    tokens = prompt(1, blocks=4, block_size=16)
    big = worker("big", block_size=32, hashes=hashes_of(tokens, 32))
    req = request(tokens)
    assert PrefixAwarePolicy().pick([worker("a"), big], req) is big
    assert req.predicted_cached_tokens == 2 * 32


def test_prefix_aware_follows_its_own_routing_history_without_reports():
    workers = fleet(4)
    policy = PrefixAwarePolicy()
    first = dispatch(policy, workers, request(prompt(7)))
    first.in_flight = 0  # the request finished
    for _ in range(3):
        req = request(prompt(7, tail=9))
        assert dispatch(policy, workers, req) is first
        assert req.predicted_cached_tokens == 4 * 16
        first.in_flight = 0
    assert policy.describe()["cache_hits"] == 3


def test_prefix_aware_spreads_cold_prefixes():
    workers = fleet(4)
    policy = PrefixAwarePolicy()
    chosen = [dispatch(policy, workers, request(prompt(seed))) for seed in range(8)]
    assert Counter(w.worker_id for w in chosen) == {"w0": 2, "w1": 2, "w2": 2, "w3": 2}
    assert policy.describe()["cold_fallbacks"] == 8
    # Cold prefixes spread even when nothing is counted in flight (requests finishing at once).
    for w in workers:
        w.in_flight = 0
    quiet = PrefixAwarePolicy()
    assert {quiet.pick(workers, request(prompt(100 + s))).worker_id for s in range(4)} == {"w0", "w1", "w2", "w3"}


def test_prefix_aware_cold_prefix_goes_to_the_least_loaded():
    workers = [worker("a", in_flight=3), worker("b", in_flight=1), worker("c", in_flight=2)]
    req = request(prompt(5))
    assert PrefixAwarePolicy().pick(workers, req).worker_id == "b"
    assert req.predicted_cached_tokens == 0


def test_prefix_aware_min_match_blocks():
    tokens = prompt(1)
    holder = worker("holder", in_flight=2, hashes=hashes_of(tokens, blocks=1))
    other = worker("other")
    assert PrefixAwarePolicy().pick([holder, other], request(tokens)) is holder
    req = request(tokens)
    assert PrefixAwarePolicy(min_match_blocks=2).pick([holder, other], req) is other
    assert req.predicted_cached_tokens == 0


def test_hot_prefix_does_not_converge_on_one_worker():
    """The known failure of cache-aware routing: every request with a popular prefix goes to the worker that has
    it, until its KV cache is full. The load guard must spill them over."""
    tokens = prompt(3)
    workers = [worker("w0"), worker("w1", hashes=hashes_of(tokens)), worker("w2"), worker("w3")]
    policy = PrefixAwarePolicy()
    for i in range(64):
        dispatch(policy, workers, request(prompt(3, tail=i % 16)))
    counts = {w.worker_id: w.in_flight for w in workers}
    assert sum(counts.values()) == 64
    assert max(counts.values()) <= 64 // 4 + 5, counts
    assert min(counts.values()) >= 64 // 4 - 5, counts
    stats = policy.describe()
    assert stats["load_guard_fallbacks"] >= 3
    # Spilled requests taught the other workers the prefix, so most picks still hit a cache.
    assert stats["cache_hits"] >= 60


def test_hot_prefix_spills_over_within_the_guard_bounds():
    tokens = prompt(3)
    holder = worker("holder", hashes=hashes_of(tokens))
    others = [worker(f"o{i}") for i in range(3)]
    policy = PrefixAwarePolicy(balance_abs=4, balance_rel=1.5)
    picks = [dispatch(policy, [holder, *others], request(tokens)) for _ in range(6)]
    # The holder takes requests until it is more than 4 ahead of the idlest worker.
    assert picks[:5] == [holder] * 5
    assert picks[5] is not holder


def test_full_holder_gets_nothing_while_others_have_room():
    tokens = prompt(3)
    holder = worker("holder", kv_used=97, hashes=hashes_of(tokens))
    others = [worker(f"o{i}") for i in range(3)]
    policy = PrefixAwarePolicy()
    for _ in range(64):
        assert dispatch(policy, [holder, *others], request(tokens)) is not holder
    assert holder.in_flight == 0
    assert max(w.in_flight for w in others) - min(w.in_flight for w in others) <= 6
    assert policy.describe()["full_avoided"] == 64
    # When every candidate is full the best match still wins (admission has already checked room).
    all_full = [holder, worker("x", kv_used=99)]
    assert PrefixAwarePolicy().pick(all_full, request(tokens)) is holder


def test_prefix_aware_load_guard_needs_both_bounds():
    tokens = prompt(2)
    # 10 vs 7: more than 4 ahead? no. Stays.
    holder = worker("holder", in_flight=10, hashes=hashes_of(tokens))
    assert PrefixAwarePolicy().pick([holder, worker("x", in_flight=7)], request(tokens)) is holder
    # 20 vs 14: 6 ahead but not 1.5x. Stays.
    holder.in_flight = 20
    assert PrefixAwarePolicy().pick([holder, worker("x", in_flight=14)], request(tokens)) is holder
    # 20 vs 12: 8 ahead and more than 1.5x. Spills.
    req = request(tokens)
    policy = PrefixAwarePolicy()
    assert policy.pick([holder, worker("x", in_flight=12)], req).worker_id == "x"
    assert req.predicted_cached_tokens == 0
    assert policy.describe()["load_guard_fallbacks"] == 1


def test_prefix_aware_equal_matches_go_to_the_lower_load():
    tokens = prompt(4)
    h = hashes_of(tokens)
    a = worker("a", in_flight=3, hashes=h)
    b = worker("b", in_flight=1, hashes=h)
    assert PrefixAwarePolicy().pick([a, b, worker("c")], request(tokens)) is b


def test_prefix_aware_forget_drops_history():
    workers = fleet(2)
    policy = PrefixAwarePolicy()
    first = dispatch(policy, workers, request(prompt(9)))
    first.in_flight = 0
    assert policy.history_size(first.worker_id) == 4
    policy.forget(first.worker_id)
    assert policy.history_size(first.worker_id) == 0
    req = request(prompt(9))
    policy.pick(workers, req)
    assert req.predicted_cached_tokens == 0


def test_prefix_aware_history_expires():
    clock = Clock()
    workers = fleet(3)
    policy = PrefixAwarePolicy(history_ttl_s=60, clock=clock)
    first = dispatch(policy, workers, request(prompt(5)))
    first.in_flight = 0
    clock.now += 59
    req = request(prompt(5))
    assert policy.pick(workers, req) is first and req.predicted_cached_tokens == 64
    clock.now += 2
    req = request(prompt(5))
    policy.pick(workers, req)
    assert req.predicted_cached_tokens == 0
    assert policy.history_size(first.worker_id) == 0


def test_prefix_aware_history_refresh_keeps_entries_alive():
    clock = Clock()
    workers = fleet(2)
    policy = PrefixAwarePolicy(history_ttl_s=60, clock=clock)
    first = dispatch(policy, workers, request(prompt(5)))
    for _ in range(3):
        first.in_flight = 0
        clock.now += 40
        assert dispatch(policy, workers, request(prompt(5))) is first


def test_prefix_aware_history_is_bounded_by_the_workers_kv_blocks():
    w = worker("w", kv_total=10)
    policy = PrefixAwarePolicy()
    for seed in range(5):
        policy.on_dispatch(w, request(prompt(seed)))  # 4 blocks each
    assert policy.history_size("w") == 10
    # The latest prompts are kept, oldest dropped.
    assert policy.matched_blocks(w, request(prompt(4))) == 4
    assert policy.matched_blocks(w, request(prompt(0))) == 0
    # A prompt longer than the bound keeps its first blocks, which are what a match needs.
    long = prompt(9, blocks=12)
    policy.on_dispatch(w, request(long))
    assert policy.matched_blocks(w, request(long)) == 10


def test_prefix_aware_counters_and_record_actual():
    tokens = prompt(1)
    holder = worker("h", hashes=hashes_of(tokens))
    policy = PrefixAwarePolicy()
    policy.pick([holder, worker("x")], request(tokens))
    policy.pick([holder, worker("x")], request(prompt(2)))
    policy.record_actual(64, 48)
    policy.record_actual(0, 0)
    info = policy.describe()
    assert info["name"] == "prefix-aware"
    assert info["picks"] == 2 and info["cache_hits"] == 1 and info["cold_fallbacks"] == 1
    assert info["predicted_cached_tokens_total"] == 64
    assert info["actual_cached_tokens_total"] == 48
    assert {"min_match_blocks", "balance_abs", "balance_rel", "full_threshold", "history_ttl_s"} <= set(info)


def test_prefix_aware_short_prompt_is_cold():
    req = request([1, 2, 3])
    chosen = PrefixAwarePolicy().pick([worker("a", in_flight=1), worker("b")], req)
    assert chosen.worker_id == "b" and req.predicted_cached_tokens == 0


# -- make_policy -------------------------------------------------------------------------------------------


def test_make_policy_builds_every_named_policy():
    names = {
        "round-robin",
        "random",
        "least-connections",
        "least-latency",
        "weighted",
        "kv-aware",
        "prefix-aware",
        "power-of-two",
        "consistent-hash",
        "prefill-queue",
    }
    assert set(POLICIES) == names
    workers = fleet(3)
    for name in names:
        policy = make_policy(name)
        assert policy.name == name
        assert policy.describe()["name"] == name
        assert policy.pick(workers, request(prompt(1))) in workers
        policy.record_actual(16, 0)  # every policy takes the report; most ignore it
        policy.forget("w0")


def test_make_policy_passes_options():
    policy = make_policy("prefix-aware", balance_abs=8, **{"history-ttl-s": 5})
    assert policy.balance_abs == 8 and policy.history_ttl_s == 5
    assert make_policy("random", seed=3).seed == 3


def test_make_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="fastest") as err:
        make_policy("fastest")
    assert "prefix-aware" in str(err.value) and "round-robin" in str(err.value)


def test_make_policy_rejects_unknown_options():
    with pytest.raises(ValueError, match="balance_ab") as err:
        make_policy("prefix-aware", balance_ab=3)
    assert "balance_abs" in str(err.value)
    with pytest.raises(ValueError, match="seed"):
        make_policy("round-robin", seed=1)


def test_policies_reject_bad_settings():
    with pytest.raises(ValueError):
        make_policy("kv-aware", full_threshold=1.5)
    with pytest.raises(ValueError):
        make_policy("prefix-aware", min_match_blocks=0)


def test_prefix_aware_a_newer_heartbeat_overrules_the_routing_history():
    clock = Clock()
    workers = fleet(2)
    policy = PrefixAwarePolicy(history_ttl_s=60, report_grace_s=2, clock=clock)
    first = dispatch(policy, workers, request(prompt(5)))
    first.in_flight = 0
    # A heartbeat within the grace period that does not list the blocks yet: the history still counts.
    first.hashes_reported_at = clock.now + 1
    req = request(prompt(5))
    assert policy.pick(workers, req) is first and req.predicted_cached_tokens == 64
    # A later heartbeat still without them: the worker evicted the prefix; the history no longer counts.
    clock.now += 10
    first.hashes_reported_at = clock.now
    req = request(prompt(5))
    policy.pick(workers, req)
    assert req.predicted_cached_tokens == 0
    # Blocks the heartbeat does report count, however old the history.
    first.block_hashes = set(request(prompt(5)).block_hashes(16))
    req = request(prompt(5))
    assert policy.pick(workers, req) is first and req.predicted_cached_tokens == 64


# -- prefill-queue ------------------------------------------------------------------------------------------


def test_prefill_queue_takes_the_fewest_tokens_to_compute_counting_cached_prompt_blocks():
    from fleetserve.contract import block_hashes

    policy = make_policy("prefill-queue")
    tokens = prompt(7, blocks=4)
    hashes = block_hashes(tokens, 16)
    busy, cached, idle = worker("busy"), worker("cached", hashes=hashes), worker("idle")
    busy.reserved_tokens, cached.reserved_tokens, idle.reserved_tokens = 500, 40, 0
    req = request(tokens)
    # cached: 40 queued + 5 to compute (4 blocks held); idle: 0 queued + 69 to compute; busy: 500 + 69
    assert policy.pick([busy, cached, idle], req) is cached
    cached.reserved_tokens = 100
    assert policy.pick([busy, cached, idle], req) is idle
    assert policy.describe() == {"name": "prefill-queue", "picks": 2}
