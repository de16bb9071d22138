"""Paged attention's masks suit any query dtype: a step mixing decodes with a prefill chunk over a cached prefix
runs in bfloat16 (query and cache) and with a float32 query over a bfloat16 cache, and agrees with float32."""

import pytest
import torch

from fleetserve.engine.attention import build_attention_batch, paged_attention

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def mixed_step(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.Tensor:
    """Two decodes (contexts 6 and 3) and a 5-token chunk after 7 cached tokens, over random cached K/V."""
    g = torch.Generator().manual_seed(0)
    starts, lengths = [5, 2, 7], [1, 1, 5]
    tables = [[0, 1], [2], [3, 4, 5]]
    batch = build_attention_batch(starts, lengths, tables, BLOCK, torch.device("cpu"))
    assert batch.decode_mask.dtype == torch.bool and batch.prefills[0].mask.dtype == torch.bool
    cache = torch.randn(6 * BLOCK, 2, KV_HEADS, DIM, generator=g).to(cache_dtype)
    t = sum(lengths)
    q = torch.randn(t, HEADS, DIM, generator=g).to(q_dtype)
    k = torch.randn(t, KV_HEADS, DIM, generator=g).to(q_dtype)
    v = torch.randn(t, KV_HEADS, DIM, generator=g).to(q_dtype)
    out = paged_attention(q, k, v, cache, batch, DIM**-0.5)
    assert out.shape == (t, HEADS * DIM) and out.dtype == q_dtype
    return out.float()


@pytest.mark.parametrize(
    ("q_dtype", "cache_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
def test_mixed_step_runs_in_bfloat16_and_matches_float32(q_dtype, cache_dtype):
    reference = mixed_step(torch.float32, torch.float32)
    got = mixed_step(q_dtype, cache_dtype)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference, atol=0.05, rtol=0.05)


def test_padding_and_future_positions_are_masked():
    batch = build_attention_batch([5, 2, 7], [1, 1, 5], [[0, 1], [2], [3, 4, 5]], BLOCK, torch.device("cpu"))
    assert batch.decode_mask[:, 0, 0].tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    mask = batch.prefills[0].mask  # rows at positions 7..11 over context 0..11
    assert mask.shape == (5, 12)
    assert [row.sum().item() for row in mask] == [8, 9, 10, 11, 12]
