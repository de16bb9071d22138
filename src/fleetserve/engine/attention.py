"""Paged attention: the step's index tensors (built once per step) and the per-layer attention over KV blocks.

The KV cache of one layer is a tensor [num_slots, 2, num_kv_heads, head_dim]; slot = block * block_size + offset.
Single-token rows (decodes) are attended together as one padded batch; each multi-token chunk (a prompt or a
piece of one) is attended on its own with a causal mask that accounts for its already-cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fleetserve.engine import decode_kernel


@dataclass
class PrefillSpan:
    """A multi-token chunk of one sequence inside the step's token batch."""

    start: int
    end: int
    """Rows [start, end) of the step's tokens."""
    context_slots: torch.Tensor | None
    """[L] slots of the whole context (cached prefix + this chunk); None when the chunk is the whole context."""
    mask: torch.Tensor | None
    """[end - start, L] boolean mask (True: may attend); None means plain causal over the chunk alone."""


@dataclass
class AttentionBatch:
    """Everything attention needs for one step, shared by all layers."""

    slot_mapping: torch.Tensor
    """[T] slot that each of the step's tokens writes its key and value to."""
    decode_rows: torch.Tensor | None
    """[Bd] rows of single-token sequences; None when there are none."""
    decode_all: bool
    """True when every row is a single-token sequence (rows == arange(T)): no gather or scatter needed."""
    decode_slots: torch.Tensor | None
    """[Bd, L] slots of each single-token sequence's context, padded."""
    decode_mask: torch.Tensor | None
    """[Bd, 1, 1, L] boolean mask: True for real context, False for padding."""
    prefills: list[PrefillSpan]
    decode_kernel: bool = False
    """Outside compiled steps too, attend the decode rows with our kernel where it is built (``decode_kernel``): set
    by a runner that compiles, whose steps are not held to the general path's rounding."""


def build_attention_batch(
    starts: list[int],
    lengths: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
    whole_blocks: bool = False,
) -> AttentionBatch:
    """Index tensors for sequences laid out back to back; sequence i computes positions starts[i] + [0, lengths[i]).

    ``whole_blocks``: the decode context width is a whole number of blocks (fewer distinct shapes, for a
    compiled step) rather than the longest context.

    Masks are boolean, so they suit attention in whatever dtype the query has (an additive mask must match it).
    """
    slots: list[int] = []
    for start, n, table in zip(starts, lengths, block_tables, strict=False):
        for pos in range(start, start + n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)

    decode_idx = [i for i, n in enumerate(lengths) if n == 1]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)

    decode_rows = decode_slots = decode_mask = None
    if decode_idx:
        ctx = [starts[i] + 1 for i in decode_idx]
        max_blocks = -(-max(ctx) // block_size)
        # pad short tables with block 0; a table may also run past its context (slots of rejected draft tokens)
        table = torch.tensor([(block_tables[i] + [0] * max_blocks)[:max_blocks] for i in decode_idx])
        max_len = max_blocks * block_size if whole_blocks else max(ctx)
        decode_slots = (table.unsqueeze(2) * block_size + torch.arange(block_size)).reshape(len(decode_idx), -1)
        decode_slots = decode_slots[:, :max_len].contiguous().to(device)
        valid = torch.arange(max_len).unsqueeze(0) < torch.tensor(ctx).unsqueeze(1)
        decode_mask = valid[:, None, None, :].to(device)
        decode_rows = torch.tensor([offsets[i] for i in decode_idx], dtype=torch.long, device=device)

    prefills = []
    for i, n in enumerate(lengths):
        if n == 1:
            continue
        start = starts[i]
        if start == 0:
            prefills.append(PrefillSpan(offsets[i], offsets[i + 1], None, None))
            continue
        total = start + n
        positions = torch.arange(total)
        table = torch.tensor(block_tables[i], dtype=torch.long)
        context_slots = (table[positions // block_size] * block_size + positions % block_size).to(device)
        # Query row r sits at position start + r and may see positions 0..start + r.
        allowed = positions.unsqueeze(0) <= (start + torch.arange(n)).unsqueeze(1)
        prefills.append(PrefillSpan(offsets[i], offsets[i + 1], context_slots, allowed.to(device)))

    return AttentionBatch(
        slot_mapping=slot_mapping,
        decode_rows=decode_rows,
        decode_all=len(decode_idx) == len(lengths),
        decode_slots=decode_slots,
        decode_mask=decode_mask,
        prefills=prefills,
    )


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: bool) -> None:
    """Put this step's keys and values ([T, Hkv, D] each) into their slots of one layer's cache.

    With ``kernel`` (steps that attend with our decode kernel) through its C++ write; otherwise inside a compiled
    graph through an op of our own, so that the write stays in place (traced as plain indexing, a write to a graph
    input is turned into a copy of the whole cache), and eagerly, straight.
    """
    if kernel:
        torch.ops.fleetserve.write_slots(kv_cache, slots, k, v)
    elif torch.compiler.is_compiling():
        torch.ops.fleetserve.write_kv(kv_cache, slots, torch.stack((k, v), dim=1))
    else:
        _write_kv(kv_cache, slots, torch.stack((k, v), dim=1))


def _write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
    kv_cache.index_copy_(0, slots, kv.to(kv_cache.dtype))


_ops = torch.library.Library("fleetserve", "FRAGMENT")
_ops.define("write_kv(Tensor(a!) kv_cache, Tensor slots, Tensor kv) -> ()")
_ops.impl("write_kv", _write_kv, "CPU")
_ops.impl("write_kv", _write_kv, "CUDA")
_ops.impl("write_kv", lambda kv_cache, slots, kv: None, "Meta")


def _gathered_decode_attention(
    qd: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """The general kernel on each decode row's context, gathered from the cache into a contiguous copy."""
    bd, width = batch.decode_slots.shape
    _, _, num_kv, head_dim = kv_cache.shape
    # index_select on a 2-D view is several times faster than advanced indexing of the 4-D cache
    ctx = kv_cache.view(kv_cache.shape[0], -1).index_select(0, batch.decode_slots.view(-1))
    ctx = ctx.view(bd, width, 2, num_kv, head_dim).to(qd.dtype)  # [Bd, L, 2, Hkv, D], in the query's dtype
    keys = ctx[:, :, 0].transpose(1, 2)  # [Bd, Hkv, L, D]
    values = ctx[:, :, 1].transpose(1, 2)
    return F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_mask, scale=scale)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """Write this step's keys and values into the cache, then attend. Returns [T, num_heads * head_dim].

    q: [T, H, D]; k, v: [T, Hkv, D]; kv_cache: [num_slots, 2, Hkv, D].
    """
    t, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    # Our kernel reads the paged cache in place (decode_kernel); compiled steps use it, and so do a compiling
    # runner's eager ones (mixed steps), whose decode rows then attend as in the compiled steps.
    kernel = (torch.compiler.is_compiling() or batch.decode_kernel) and kv_cache.is_cpu and decode_kernel.ready()
    write_kv(kv_cache, batch.slot_mapping, k, v, kernel)
    out = q.new_empty(t, num_heads, head_dim)

    if batch.decode_rows is not None:
        qd = q if batch.decode_all else q[batch.decode_rows]
        # Grouped-query attention without copying K/V: a kv head's `group` query heads act as `group` query rows.
        qd = qd.view(-1, num_kv, group, head_dim)  # [Bd, Hkv, G, D]
        if kernel:
            o = torch.ops.fleetserve.decode_attention(qd, kv_cache, batch.decode_slots, batch.decode_mask, scale)
        else:
            o = _gathered_decode_attention(qd, kv_cache, batch, scale)
        o = o.reshape(-1, num_heads, head_dim).to(q.dtype)
        if batch.decode_all:
            return o.reshape(t, num_heads * head_dim)
        out[batch.decode_rows] = o

    # A batch of one, so that PyTorch's fused CPU kernel takes it (three dimensions go to its unfused path, half as
    # fast on a prompt of 40 tokens), with the kv heads shared by their query heads rather than copied.
    for span in batch.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if span.context_slots is None:
            ks, vs = k[span.start : span.end], v[span.start : span.end]
        else:
            ctx = kv_cache.view(kv_cache.shape[0], -1).index_select(0, span.context_slots)
            ctx = ctx.view(-1, 2, num_kv, head_dim)  # [L, 2, Hkv, D]
            ks, vs = ctx[:, 0].to(q.dtype), ctx[:, 1].to(q.dtype)
        ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=group > 1
        )
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out.reshape(t, num_heads * head_dim)
