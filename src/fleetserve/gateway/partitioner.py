"""The layer partitioner for pipeline stages: one model's decoder layers split into contiguous ranges over nodes.

Each stage node offers a memory cap for the model's weights plus KV, a measured time per decoder layer and step,
and the latency of the link into it. A plan gives every stage a contiguous range of layers, in stage order, so that
every layer lives exactly once, every stage holds its weights plus KV for the whole context window of each of its
layers, and the slowest stage per step (the pipeline's bottleneck) is as fast as the nodes allow.

The head (``stages[0]``) also holds the embedding table and the LM head and samples: its memory is smaller for
layers, and the LM head's read of the vocabulary matrix costs it compute every step, so it tends to take fewer
layers. Every node is tried as the head; the others follow in registration order. Nodes that could never be a
stage (less than one layer plus its KV) are ignored; nodes a plan does not need are left out as spares.

Pure Python: the gateway runs it whenever stage nodes join, leave or report new measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1 << 20
_TOLERANCE = 1e-9  # in layers (allowances) and relative (bottleneck ties): float noise, not a real difference


def _mib_down(n: int) -> int:
    return n // MIB


def _mib_up(n: int) -> int:
    return -(-n // MIB)


@dataclass(frozen=True)
class ModelSize:
    """What placing one model needs, in bytes (a stage worker reports these from the model's architecture and dtype)."""

    num_layers: int
    """Decoder layers of the model."""
    layer_bytes: int
    """Weights of one decoder layer."""
    embed_bytes: int
    """The embedding table (the head stage holds it)."""
    lm_head_bytes: int
    """Memory of the LM head beyond the embedding table: 0 when tied to the embeddings."""
    lm_head_read_bytes: int
    """Weight bytes the LM head reads per step (vocab x hidden x element size), tied or not."""
    kv_bytes_per_token: int
    """KV of one token in one layer."""
    context_tokens: int
    """A stage must hold KV for this many tokens of each of its layers (the context window)."""
    block_size: int
    """Tokens per KV block."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "layer_bytes", "kv_bytes_per_token", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSize.{name} must be positive, got {getattr(self, name)}")
        for name in ("embed_bytes", "lm_head_bytes", "lm_head_read_bytes", "context_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelSize.{name} must not be negative, got {getattr(self, name)}")

    @property
    def kv_min_layer_bytes(self) -> int:
        """KV of the context window for one layer, in whole blocks."""
        blocks = -(-self.context_tokens // self.block_size)
        return blocks * self.block_size * self.kv_bytes_per_token

    @property
    def layer_stage_bytes(self) -> int:
        """What each layer a stage takes costs it: the layer's weights plus KV for the context."""
        return self.layer_bytes + self.kv_min_layer_bytes

    @property
    def total_weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.embed_bytes + self.lm_head_bytes

    @property
    def head_fixed_bytes(self) -> int:
        """Weights only the head holds: the embedding table and an untied LM head."""
        return self.embed_bytes + self.lm_head_bytes

    @property
    def minimum_bytes(self) -> int:
        """The least a stage node may offer: one layer plus KV for the context."""
        return self.layer_stage_bytes


@dataclass(frozen=True)
class StageNode:
    """A node that can serve pipeline stages of the model, with what it offers and how fast it is."""

    node_id: str
    name: str
    memory_bytes: int
    """The node's cap for this model's weights plus KV."""
    layer_seconds: float
    """Measured: seconds one decoder layer takes for one step (calibration)."""
    link_seconds: float = 0.0
    """Measured latency of the link into this node."""
    order: int = 0
    """Registration order: ties and the order of non-head stages follow it."""

    def __post_init__(self) -> None:
        if not self.layer_seconds > 0:
            raise ValueError(f"node {self.name}: layer_seconds must be positive, got {self.layer_seconds}")
        if self.link_seconds < 0:
            raise ValueError(f"node {self.name}: link_seconds must not be negative, got {self.link_seconds}")
        if self.memory_bytes < 0:
            raise ValueError(f"node {self.name}: memory_bytes must not be negative, got {self.memory_bytes}")


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan: the node, its layers ``[layer_start, layer_end)`` and what it holds."""

    node_id: str
    name: str
    layer_start: int
    layer_end: int
    kv_blocks: int
    """KV blocks this node can hold for its layers under its cap."""
    weight_bytes: int
    """Weights it holds: its layers, plus the embedding table and LM head on the head."""

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class PipelinePlan:
    """Where every layer of the model runs."""

    stages: tuple[StagePlan, ...]
    """stages[0] is the head: embeddings, LM head and sampling live there."""
    kv_blocks: int
    """The pipeline's KV blocks: the least any stage can hold."""
    bottleneck_s: float
    """Estimated time of the slowest stage per step."""

    def ranges(self) -> list[tuple[str, int, int]]:
        """(node_id, start, end) of every stage, in stage order."""
        return [(s.node_id, s.layer_start, s.layer_end) for s in self.stages]

    def describe(self) -> str:
        """One line for logs and the console, e.g. ``node-a [0, 12) -> node-b [12, 30)``."""
        return " -> ".join(f"{s.name} [{s.layer_start}, {s.layer_end})" for s in self.stages)


@dataclass(frozen=True)
class Shortfall:
    """The registered nodes cannot hold the model: how far they get and what is missing."""

    placed_bytes: int
    """Model weight bytes the registered nodes can hold at best."""
    needed_bytes: int
    """The model's weight bytes."""
    reason: str
    """e.g. "waiting for capacity: 340 of 514 MiB placed; add a stage node with at least 200 MiB"."""


def below_minimum(size: ModelSize, node: StageNode) -> str | None:
    """Why ``node`` can never be a stage of this model (None when it can): it offers less than one layer plus KV for
    the context. The reason names the node, what it offers and what a stage needs, in MiB, e.g.
    "node tiny offers 20 MiB; a stage of this model needs at least 27 MiB (one 14 MiB layer plus KV for 8192 tokens)".
    """
    if node.memory_bytes >= size.minimum_bytes:
        return None
    return (
        f"node {node.name} offers {_mib_down(node.memory_bytes)} MiB; a stage of this model needs at least "
        f"{_mib_up(size.minimum_bytes)} MiB (one {_mib_up(size.layer_bytes)} MiB layer plus KV for "
        f"{size.context_tokens} tokens)"
    )


def better(new: PipelinePlan, old: PipelinePlan | None, margin: float = 0.1) -> bool:
    """Whether re-partitioning from ``old`` to ``new`` is worth it: no old plan, or new's bottleneck is at least
    ``margin`` lower."""
    return old is None or new.bottleneck_s <= old.bottleneck_s * (1.0 - margin)


# -- one ordering: a head, then the other nodes ---------------------------------------------------------------


@dataclass(frozen=True)
class _Ordering:
    """Nodes in stage order (the head first), with the most layers each can hold and each one's fixed step cost."""

    nodes: tuple[StageNode, ...]
    caps: tuple[int, ...]
    """Most layers each node can hold under its cap, never more than the model has."""
    fixed_s: tuple[float, ...]
    """Seconds a stage costs per step whatever its layers: the link, plus the LM head on the head."""

    @classmethod
    def make(cls, size: ModelSize, nodes: Sequence[StageNode]) -> _Ordering:
        caps, fixed_s = [], []
        for i, node in enumerate(nodes):
            fixed = size.head_fixed_bytes if i == 0 else 0
            caps.append(min(size.num_layers, max(0, (node.memory_bytes - fixed) // size.layer_stage_bytes)))
            extra = size.lm_head_read_bytes / size.layer_bytes * node.layer_seconds if i == 0 else 0.0
            fixed_s.append(node.link_seconds + extra)
        return cls(tuple(nodes), tuple(caps), tuple(fixed_s))

    def feasible(self, num_layers: int) -> bool:
        return self.caps[0] >= 1 and sum(self.caps) >= num_layers

    def stage_seconds(self, i: int, layers: int) -> float:
        return layers * self.nodes[i].layer_seconds + self.fixed_s[i]

    def allowance(self, i: int, t: float) -> int:
        """The most layers node ``i`` can take with its stage time within ``t``."""
        layers = int((t - self.fixed_s[i]) / self.nodes[i].layer_seconds + _TOLERANCE)
        return max(0, min(self.caps[i], layers))

    def bottleneck(self, num_layers: int) -> float:
        """The smallest stage time at which the nodes' allowances cover every layer, the head taking at least one."""
        head_min = self.stage_seconds(0, 1)
        times = {self.stage_seconds(i, n) for i, cap in enumerate(self.caps) for n in range(1, cap + 1)}
        candidates = sorted(t for t in times if t >= head_min)
        lo, hi = 0, len(candidates) - 1  # the allowances grow with t, and the last candidate lets every cap in
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(self.allowance(i, candidates[mid]) for i in range(len(self.nodes))) >= num_layers:
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo]

    def plan(self, size: ModelSize) -> PipelinePlan:
        """Contiguous ranges in stage order, each node taking what it may at the bottleneck; the rest are spares."""
        t = self.bottleneck(size.num_layers)
        stages, start = [], 0
        for i, node in enumerate(self.nodes):
            layers = min(self.allowance(i, t), size.num_layers - start)
            if layers == 0:
                continue
            weight = layers * size.layer_bytes + (size.head_fixed_bytes if i == 0 else 0)
            kv_blocks = (node.memory_bytes - weight) // (size.block_size * layers * size.kv_bytes_per_token)
            stages.append(StagePlan(node.node_id, node.name, start, start + layers, kv_blocks, weight))
            start += layers
        assert start == size.num_layers and stages[0].node_id == self.nodes[0].node_id, "a plan places every layer"
        index = {node.node_id: i for i, node in enumerate(self.nodes)}
        bottleneck_s = max(self.stage_seconds(index[s.node_id], s.layers) for s in stages)
        return PipelinePlan(tuple(stages), min(s.kv_blocks for s in stages), bottleneck_s)

    def placed(self, size: ModelSize) -> tuple[int, int, int]:
        """(weight bytes placed, head bytes missing, layers missing) when the nodes hold what they can."""
        head_ok = self.caps[0] >= 1
        layers = min(sum(self.caps), size.num_layers)
        placed = (size.head_fixed_bytes if head_ok else 0) + layers * size.layer_bytes
        missing_fixed = 0 if head_ok else size.head_fixed_bytes
        return min(placed, size.total_weight_bytes), missing_fixed, size.num_layers - layers


def _orderings(size: ModelSize, nodes: Sequence[StageNode]) -> list[_Ordering]:
    """Every eligible node as the head, the others following in registration order."""
    eligible = sorted((n for n in nodes if below_minimum(size, n) is None), key=lambda n: (n.order, n.node_id))
    return [_Ordering.make(size, [head, *(n for n in eligible if n is not head)]) for head in eligible]


def _preferred(new: PipelinePlan, best: PipelinePlan | None) -> bool:
    """Whether ``new`` beats ``best``: a faster bottleneck, then more KV blocks, then fewer stages."""
    if best is None:
        return True
    if abs(new.bottleneck_s - best.bottleneck_s) > _TOLERANCE * max(new.bottleneck_s, best.bottleneck_s):
        return new.bottleneck_s < best.bottleneck_s
    if new.kv_blocks != best.kv_blocks:
        return new.kv_blocks > best.kv_blocks
    return len(new.stages) < len(best.stages)


def _shortfall(size: ModelSize, orderings: list[_Ordering]) -> Shortfall:
    placed, missing_fixed, missing_layers = 0, size.head_fixed_bytes, size.num_layers
    for ordering in orderings:
        got = ordering.placed(size)
        if got[0] > placed:
            placed, missing_fixed, missing_layers = got
    # What one more node would need to hold the rest: the missing layers with their KV, and the head's weights
    # with a layer of its own if no node can be the head.
    add = missing_fixed + missing_layers * size.layer_stage_bytes
    add = max(add, size.minimum_bytes + missing_fixed)
    needed = size.total_weight_bytes
    reason = (
        f"waiting for capacity: {_mib_down(placed)} of {_mib_up(needed)} MiB placed; "
        f"add a stage node with at least {_mib_up(add)} MiB"
    )
    return Shortfall(placed_bytes=placed, needed_bytes=needed, reason=reason)


def partition(size: ModelSize, nodes: Sequence[StageNode]) -> PipelinePlan | Shortfall:
    """The fastest plan for ``size`` over ``nodes``, or a Shortfall when they cannot hold the model.

    Nodes below the minimum are ignored. Every eligible node is tried as the head; among the plans, the smallest
    bottleneck wins, then the most KV blocks, then the fewest stages, then the earlier head. The same input gives
    the same plan.
    """
    orderings = _orderings(size, nodes)
    best: PipelinePlan | None = None
    for ordering in orderings:
        if ordering.feasible(size.num_layers):
            plan = ordering.plan(size)
            if _preferred(plan, best):
                best = plan
    return best if best is not None else _shortfall(size, orderings)
