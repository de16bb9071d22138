"""Our decode-attention kernel against the general attention kernel (scaled_dot_product_attention over the
gathered context), on the paged cache layout: float32 and bfloat16 caches, grouped-query heads, contexts from one
token to the whole padded width, rows whose blocks lie anywhere in the cache. Built on this machine as the
engine builds it (a C++ compiler is what compiled decode steps need too)."""

import pytest
import torch
import torch.nn.functional as F

from fleetserve.engine import decode_kernel
from fleetserve.model_files.catalog import cache_root

pytestmark = [pytest.mark.slow, pytest.mark.compiles]

BLOCK = 16
BLOCKS = 64
KV_HEADS, GROUP, DIM = 3, 3, 64


@pytest.fixture(scope="module")
def kernel():
    assert decode_kernel.ensure_loaded(cache_root() / "kernels"), "the decode-attention kernel did not build"
    return torch.ops.fleetserve.decode_attention


def reference(q, cache, slots, mask, scale):
    rows, width = slots.shape
    ctx = cache.view(cache.shape[0], -1).index_select(0, slots.view(-1)).view(rows, width, 2, KV_HEADS, DIM)
    keys, values = ctx[:, :, 0].transpose(1, 2).float(), ctx[:, :, 1].transpose(1, 2).float()
    return F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contexts", [[1], [37], [1, 48, 17], [64, 64, 2, 63]])
def test_the_kernel_equals_the_general_attention(kernel, dtype, contexts):
    gen = torch.Generator().manual_seed(len(contexts) * 100 + contexts[0])
    cache = torch.randn(BLOCKS * BLOCK, 2, KV_HEADS, DIM, generator=gen).to(dtype)
    width = -(-max(contexts) // BLOCK) * BLOCK
    tables = torch.randperm(BLOCKS, generator=gen)[: len(contexts) * width // BLOCK].view(len(contexts), -1)
    slots = (tables.unsqueeze(2) * BLOCK + torch.arange(BLOCK)).reshape(len(contexts), -1)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(contexts).unsqueeze(1))[:, None, None, :]
    q = torch.randn(len(contexts), KV_HEADS, GROUP, DIM, generator=gen).to(dtype)
    got = kernel(q, cache, slots, mask, DIM**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, cache, slots, mask, DIM**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("heads", "group", "dim"), [(4, 1, 64), (2, 5, 128), (1, 8, 64), (2, 3, 32)])
def test_the_kernel_equals_the_general_attention_at_other_head_shapes(kernel, heads, group, dim):
    """Head sizes of 64 and 128 take the kernel's vectorized path (query rows in fours or twos), others the
    general one."""
    gen = torch.Generator().manual_seed(heads * 100 + group * 10 + dim)
    contexts = [70, 3, 129]
    cache = torch.randn(BLOCKS * BLOCK, 2, heads, dim, generator=gen).bfloat16()
    width = -(-max(contexts) // BLOCK) * BLOCK
    tables = torch.randperm(BLOCKS, generator=gen)[: len(contexts) * width // BLOCK].view(len(contexts), -1)
    slots = (tables.unsqueeze(2) * BLOCK + torch.arange(BLOCK)).reshape(len(contexts), -1)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(contexts).unsqueeze(1))[:, None, None, :]
    q = torch.randn(len(contexts), heads, group, dim, generator=gen)
    got = kernel(q, cache, slots, mask, dim**-0.5)
    ctx = cache.view(cache.shape[0], -1).index_select(0, slots.view(-1)).view(len(contexts), width, 2, heads, dim)
    keys, values = ctx[:, :, 0].transpose(1, 2).float(), ctx[:, :, 1].transpose(1, 2).float()
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_kernel_refuses_what_it_cannot_read(kernel):
    cache = torch.zeros(BLOCK, 2, KV_HEADS, DIM)
    slots = torch.arange(BLOCK).view(1, -1)
    mask = torch.ones(1, 1, 1, BLOCK, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="heads and head size"):
        kernel(torch.zeros(1, 2, GROUP, DIM), cache, slots, mask, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        kernel(torch.zeros(1, KV_HEADS, GROUP, DIM), cache, slots.int(), mask, 1.0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_write_puts_each_row_in_its_slot_as_the_general_write_does(kernel, cache_dtype, step_dtype):
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(BLOCKS * BLOCK, 2, KV_HEADS, DIM, generator=gen).to(cache_dtype)
    want = cache.clone()
    # as a step has them: k a tensor of its own, v a slice of the fused projection's output (rows strided)
    fused = torch.randn(5, 3 * KV_HEADS * DIM, generator=gen).to(step_dtype)
    k = torch.randn(5, KV_HEADS, DIM, generator=gen).to(step_dtype)
    v = fused[:, 2 * KV_HEADS * DIM :].view(5, KV_HEADS, DIM)
    slots = torch.tensor([3, 700, 17, 1023, 4])
    torch.ops.fleetserve.write_slots(cache, slots, k, v)
    want.index_copy_(0, slots, torch.stack((k, v), dim=1).to(cache_dtype))
    assert torch.equal(cache, want)


def test_the_kernels_write_refuses_a_slot_outside_the_cache(kernel):
    cache = torch.zeros(BLOCK, 2, KV_HEADS, DIM)
    k = torch.ones(1, KV_HEADS, DIM)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.fleetserve.write_slots(cache, torch.tensor([BLOCK]), k, k)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fleetserve.write_slots(cache, torch.tensor([0], dtype=torch.int32), k, k)
    assert not cache.any()
