"""The layer partitioner: contiguous ranges over stage nodes, within every node's memory, slowest stage minimised."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from fleetserve.gateway.partitioner import (
    MIB,
    ModelSize,
    PipelinePlan,
    Shortfall,
    StageNode,
    StagePlan,
    below_minimum,
    better,
    partition,
)

# SmolLM2-135M in float32: 30 layers of 13.5 MiB, a tied 108 MiB embedding table, 3 MiB of KV per layer for the
# 2048-token context. Its weights are exactly 513 MiB; a stage needs at least 16.5 MiB.
SMOL = ModelSize(
    num_layers=30,
    layer_bytes=14_155_776,
    embed_bytes=49152 * 576 * 4,
    lm_head_bytes=0,
    lm_head_read_bytes=49152 * 576 * 4,
    kv_bytes_per_token=2 * 3 * 64 * 4,
    context_tokens=2048,
    block_size=16,
)


def node(i: int, mib: float, layer_s: float = 0.001, link_s: float = 0.0, order: int | None = None) -> StageNode:
    return StageNode(f"n{i}", f"node-{i}", int(mib * MIB), layer_s, link_s, i if order is None else order)


def check_plan(size: ModelSize, nodes: list[StageNode], plan: PipelinePlan) -> None:
    """Every invariant a plan must keep, whatever the nodes."""
    by_id = {n.node_id: n for n in nodes}
    ranges = plan.ranges()
    assert ranges[0][1] == 0 and ranges[-1][2] == size.num_layers
    assert all(a[2] == b[1] for a, b in itertools.pairwise(ranges))  # contiguous: every layer exactly once
    assert all(s.layer_end > s.layer_start for s in plan.stages)
    assert len({s.node_id for s in plan.stages}) == len(plan.stages)
    for i, stage in enumerate(plan.stages):
        n = by_id[stage.node_id]
        assert below_minimum(size, n) is None
        assert stage.weight_bytes == stage.layers * size.layer_bytes + (size.head_fixed_bytes if i == 0 else 0)
        kv = stage.kv_blocks * size.block_size * stage.layers * size.kv_bytes_per_token
        assert stage.weight_bytes + kv <= n.memory_bytes
        assert stage.kv_blocks * size.block_size >= size.context_tokens
    assert plan.kv_blocks == min(s.kv_blocks for s in plan.stages)


def layers_of(plan: PipelinePlan) -> dict[str, int]:
    return {s.node_id: s.layers for s in plan.stages}


def test_model_size_helpers():
    assert SMOL.kv_min_layer_bytes == 2048 * 1536 == 3 * MIB
    assert SMOL.total_weight_bytes == 537_919_488 == 513 * MIB
    assert SMOL.head_fixed_bytes == 108 * MIB
    assert SMOL.minimum_bytes == 14_155_776 + 3 * MIB
    ragged = ModelSize(30, 1000, 0, 0, 0, 10, context_tokens=2050, block_size=16)
    assert ragged.kv_min_layer_bytes == 129 * 16 * 10  # whole blocks


def test_bad_sizes_and_nodes_are_refused():
    with pytest.raises(ValueError, match="layer_bytes"):
        ModelSize(30, 0, 0, 0, 0, 10, 100, 16)
    with pytest.raises(ValueError, match="layer_seconds"):
        StageNode("a", "a", 10 * MIB, 0.0)


def test_whole_model_on_one_roomy_node():
    plan = partition(SMOL, [node(0, 2048)])
    assert isinstance(plan, PipelinePlan)
    assert plan.ranges() == [("n0", 0, 30)]
    assert plan.stages[0].weight_bytes == 513 * MIB
    # (2048 - 513) MiB of KV at 16 tokens x 30 layers x 1536 bytes a block
    assert plan.kv_blocks == (2048 - 513) * MIB // (16 * 30 * 1536) == 2183
    assert plan.bottleneck_s == pytest.approx((30 + 8) * 0.001)  # the LM head reads 8 layers' worth of weights
    assert plan.describe() == "node-0 [0, 30)"


def test_two_equal_nodes_split_with_fewer_layers_on_the_head():
    plan = partition(SMOL, [node(0, 1024), node(1, 1024)])
    assert isinstance(plan, PipelinePlan)
    # the head's 11 layers plus the LM head (8 layers' worth) take as long as the other's 19
    assert plan.ranges() == [("n0", 0, 11), ("n1", 11, 30)]
    assert plan.bottleneck_s == pytest.approx(0.019)
    assert plan.describe() == "node-0 [0, 11) -> node-1 [11, 30)"
    check_plan(SMOL, [node(0, 1024), node(1, 1024)], plan)


def test_a_faster_node_takes_more_layers():
    nodes = [node(0, 1024, layer_s=0.002), node(1, 1024, layer_s=0.001)]
    plan = partition(SMOL, nodes)
    assert isinstance(plan, PipelinePlan)
    # Either head gives a 26 ms bottleneck; the fast head leaves more KV blocks (1595 against 1171).
    assert plan.ranges() == [("n1", 0, 18), ("n0", 18, 30)]
    assert plan.bottleneck_s == pytest.approx(0.026)
    assert plan.kv_blocks == 1595
    check_plan(SMOL, nodes, plan)


def test_a_slow_link_takes_layers_off_its_node():
    nodes = [node(0, 1024), node(1, 1024, link_s=0.004)]
    plan = partition(SMOL, nodes)
    assert isinstance(plan, PipelinePlan)
    assert plan.ranges() == [("n0", 0, 13), ("n1", 13, 30)]  # 13 + 8 = 17 + 4
    assert plan.bottleneck_s == pytest.approx(0.021)


def test_memory_caps_bind():
    nodes = [node(i, 210) for i in range(3)]
    assert all(n.memory_bytes < SMOL.total_weight_bytes for n in nodes)
    plan = partition(SMOL, nodes)
    assert isinstance(plan, PipelinePlan)
    # The head has room for 6 layers beside the embeddings, the others for 12: speed alone would put 5, 13, 12.
    assert plan.ranges() == [("n0", 0, 6), ("n1", 6, 18), ("n2", 18, 30)]
    assert plan.bottleneck_s == pytest.approx(0.014)
    assert plan.kv_blocks == 149
    check_plan(SMOL, nodes, plan)


def test_uneven_memory_puts_the_head_on_the_roomy_node():
    nodes = [node(0, 120), node(1, 400), node(2, 120)]
    plan = partition(SMOL, nodes)
    assert isinstance(plan, PipelinePlan)
    assert plan.stages[0].node_id == "n1"  # only it holds the embeddings and a layer
    assert [s.node_id for s in plan.stages[1:]] == ["n0", "n2"]  # the others in registration order
    check_plan(SMOL, nodes, plan)


def test_a_slow_spare_node_is_left_out():
    nodes = [node(0, 2048), node(1, 2048, layer_s=0.1)]
    plan = partition(SMOL, nodes)
    assert isinstance(plan, PipelinePlan)
    assert plan.ranges() == [("n0", 0, 30)]


def test_a_node_below_the_minimum_is_named_and_ignored():
    tiny = StageNode("t", "tiny", 10 * MIB, 0.0001, order=0)
    assert below_minimum(SMOL, tiny) == (
        "node tiny offers 10 MiB; a stage of this model needs at least 17 MiB "
        "(one 14 MiB layer plus KV for 2048 tokens)"
    )
    assert below_minimum(SMOL, StageNode("e", "exact", SMOL.minimum_bytes, 0.001)) is None
    assert below_minimum(SMOL, StageNode("e", "short", SMOL.minimum_bytes - 1, 0.001)) is not None
    plan = partition(SMOL, [tiny, node(1, 1024), node(2, 1024)])
    assert isinstance(plan, PipelinePlan)
    assert "t" not in layers_of(plan)
    assert plan.ranges() == [("n1", 0, 11), ("n2", 11, 30)]


def test_shortfall_when_the_nodes_cannot_hold_every_layer():
    result = partition(SMOL, [node(0, 300), node(1, 100)])
    assert isinstance(result, Shortfall)
    # head on the 300 MiB node: the embeddings and 11 layers there, 6 layers on the other (17 of 30)
    assert result.placed_bytes == 108 * MIB + 17 * 14_155_776
    assert result.needed_bytes == 513 * MIB
    # 337.5 MiB placed rounds down; the 13 missing layers need 13 x 16.5 = 214.5 MiB with their KV
    assert result.reason == "waiting for capacity: 337 of 513 MiB placed; add a stage node with at least 215 MiB"


def test_shortfall_when_no_node_can_hold_the_head():
    result = partition(SMOL, [node(0, 100), node(1, 100)])
    assert isinstance(result, Shortfall)
    assert result.placed_bytes == 6 * 14_155_776  # layers on the one node that is not the head
    assert result.reason.startswith("waiting for capacity: 81 of 513 MiB placed; ")


@pytest.mark.parametrize("nodes", [[], [node(0, 10)]], ids=["none", "all-below-minimum"])
def test_shortfall_without_eligible_nodes(nodes):
    result = partition(SMOL, nodes)
    assert isinstance(result, Shortfall)
    assert result.placed_bytes == 0
    assert result.reason == "waiting for capacity: 0 of 513 MiB placed; add a stage node with at least 603 MiB"


def test_random_node_sets_keep_every_invariant():
    rng = random.Random(1234)
    plans = shortfalls = 0
    for _ in range(300):
        nodes = [
            StageNode(
                f"id{i}",
                f"node{i}",
                rng.randint(5 * MIB, 700 * MIB),
                rng.uniform(0.0005, 0.005),
                rng.choice([0.0, rng.uniform(0.0, 0.01)]),
                order=rng.randint(0, 3),
            )
            for i in range(rng.randint(1, 6))
        ]
        result = partition(SMOL, nodes)
        if isinstance(result, PipelinePlan):
            plans += 1
            check_plan(SMOL, nodes, result)
        else:
            shortfalls += 1
            assert 0 <= result.placed_bytes < result.needed_bytes == SMOL.total_weight_bytes
            pattern = r"waiting for capacity: (\d+) of 513 MiB placed; add a stage node with at least \d+ MiB"
            match = re.fullmatch(pattern, result.reason)
            assert match and int(match.group(1)) == result.placed_bytes // MIB
    assert plans > 50 and shortfalls > 20


def brute_force_bottleneck(size: ModelSize, nodes: list[StageNode]) -> float | None:
    """The least bottleneck over every head and every split (spares allowed), by enumeration."""
    best = None
    for head in nodes:
        caps, times = [], []
        for n in nodes:
            fixed = size.head_fixed_bytes if n is head else 0
            caps.append(min(size.num_layers, max(0, (n.memory_bytes - fixed) // size.minimum_bytes)))
            extra = size.lm_head_read_bytes / size.layer_bytes * n.layer_seconds if n is head else 0.0
            times.append(lambda k, n=n, extra=extra: k * n.layer_seconds + n.link_seconds + extra)
        h = nodes.index(head)
        for split in itertools.product(*(range(c + 1) for c in caps)):
            if split[h] == 0 or sum(split) != size.num_layers:
                continue
            t = max(times[i](k) for i, k in enumerate(split) if k)
            best = t if best is None else min(best, t)
    return best


def test_the_bottleneck_is_the_least_any_split_reaches():
    small = ModelSize(8, 1000, 2000, 500, 2500, kv_bytes_per_token=1, context_tokens=100, block_size=10)
    rng = random.Random(7)
    for _ in range(60):
        nodes = [
            StageNode(f"id{i}", f"n{i}", rng.randint(900, 9000), rng.uniform(0.5, 2.0), rng.uniform(0.0, 1.0), i)
            for i in range(rng.randint(1, 4))
        ]
        result = partition(small, nodes)
        expected = brute_force_bottleneck(small, [n for n in nodes if below_minimum(small, n) is None])
        if expected is None:
            assert isinstance(result, Shortfall)
        else:
            assert isinstance(result, PipelinePlan)
            assert result.bottleneck_s == pytest.approx(expected)
            check_plan(small, nodes, result)


def test_better_needs_the_margin():
    def plan(bottleneck_s: float) -> PipelinePlan:
        return PipelinePlan((StagePlan("a", "a", 0, 30, 10, 0),), kv_blocks=10, bottleneck_s=bottleneck_s)

    assert better(plan(5.0), None)
    assert not better(plan(0.95), plan(1.0))
    assert better(plan(0.9), plan(1.0))  # exactly the margin
    assert better(plan(0.5), plan(1.0))
    assert not better(plan(1.2), plan(1.0), margin=0.0)
    assert better(plan(0.95), plan(1.0), margin=0.0)
    assert better(plan(1.0), plan(1.0), margin=0.0)
    assert not better(plan(0.95), plan(1.0), margin=0.5)


def test_the_same_nodes_give_the_same_plan_in_any_order():
    nodes = [node(i, 150 + 40 * i, layer_s=0.001 * (1 + i % 3), link_s=0.0005 * i) for i in range(5)]
    first = partition(SMOL, nodes)
    assert isinstance(first, PipelinePlan)
    for seed in range(10):
        shuffled = nodes[:]
        random.Random(seed).shuffle(shuffled)
        assert partition(SMOL, shuffled) == first


def test_equal_nodes_tie_to_the_earlier_head_by_order():
    plan = partition(SMOL, [node(0, 1024, order=5), node(1, 1024, order=2)])
    assert isinstance(plan, PipelinePlan)
    assert plan.ranges() == [("n1", 0, 11), ("n0", 11, 30)]


def test_fewer_stages_win_a_tie_in_bottleneck_and_kv():
    small = ModelSize(4, 1000, 2000, 0, 1000, kv_bytes_per_token=1, context_tokens=100, block_size=10)
    nodes = [
        StageNode("a", "a", 3300, 1.0, order=0),
        StageNode("b", "b", 1100, 1.0, order=1),
        StageNode("c", "c", 6600, 2.0, order=2),
    ]
    plan = partition(small, nodes)
    assert isinstance(plan, PipelinePlan)
    # head a: a [0, 1) -> b [1, 2) -> c [2, 4), also 4 s and 10 blocks, but three stages
    assert plan.ranges() == [("c", 0, 1), ("a", 1, 4)]
    assert (plan.bottleneck_s, plan.kv_blocks) == (4.0, 10)
