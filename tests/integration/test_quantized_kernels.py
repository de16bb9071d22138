"""Our kernels for integer codes. Wide int4 steps: the de-quantizing kernel gives exactly the int4 kernel's weight
rounded to bfloat16, a layer switches to it only above its row count, an LM head on codes runs wide steps on a
bfloat16 copy, and an engine whose prompt chunks take the wide path computes the logits the int4 kernel does to
bfloat16 precision. The int8 GEMV computes what the head's codes stand for, in float32. The int8 dot-product
kernel computes int8-quantized activations times the codes (checked against float64), a layer takes it only
between its row counts, and an engine on it gives the int4 kernel's logits to int8-activation precision. Built on this machine as
the engine builds it (a C++ compiler is what compiled decode steps need too)."""

import pytest
import torch

from fleetserve.engine import quantized_kernels
from fleetserve.engine.cpp_kernel import cpu_flags
from fleetserve.engine.models.quantized import Int4Linear, Int8Linear, int4_kernels_work, int4_weight, keep_dense
from fleetserve.engine.weight_format import cpu_has_bf16
from fleetserve.model_files.catalog import cache_root

pytestmark = [
    pytest.mark.slow,
    pytest.mark.compiles,
    pytest.mark.skipif(not int4_kernels_work(), reason="this PyTorch has no CPU int4/int8 kernels"),
]


@pytest.fixture(scope="module")
def dequant():
    assert quantized_kernels.KERNEL.ensure_loaded(cache_root() / "kernels"), "our quantized kernels did not build"
    return _dequantized_weight_t


def _dequantized_weight_t(packed, scales_and_zeros, n, k):
    """The weight ``int4_dequant_mm`` multiplies by, [K, N] in bfloat16: the identity times it (exact: one product
    of 1 and the weight per output, the rest zeros)."""
    return quantized_kernels.int4_dequant_mm(torch.eye(k, dtype=torch.bfloat16), packed, scales_and_zeros, n)


def random_layer(n, k, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales, mins = torch.rand(n, k // 32, generator=g) / 16, -torch.rand(n, k // 32, generator=g) / 2
    b = torch.randn(n, generator=g) if bias else None
    return Int4Linear(codes, scales, mins, b), codes, g


@pytest.mark.parametrize("shape", [(64, 32), (128, 96), (960, 576), (576, 1536)])
def test_the_kernel_gives_the_int4_kernels_weight_in_bfloat16(dequant, shape):
    n, k = shape
    layer, codes, _ = random_layer(n, k, seed=n + k)
    scale = layer.scales_and_zeros[..., 0].float().repeat_interleave(32, 0)  # [K, N], as the int4 kernel holds them
    zero = layer.scales_and_zeros[..., 1].float().repeat_interleave(32, 0)
    expected = ((codes.t().float() - 8) * scale + zero).bfloat16()
    got = dequant(layer.packed, layer.scales_and_zeros, n, k)
    assert got.dtype == torch.bfloat16 and got.shape == (k, n)
    assert torch.equal(got, expected)


def test_a_layer_de_quantizes_only_above_its_row_count(dequant):
    layer, codes, g = random_layer(128, 96, seed=5, bias=True)
    narrow_only, _, _ = random_layer(128, 96, seed=5, bias=True)
    layer.wide_rows = 8
    weight = int4_weight(codes, *(t.float() for t in _scales_mins(layer)))
    for rows in (1, 8, 9, 200):
        x = torch.randn(rows, 96, generator=g)
        got = layer(x)
        if rows <= 8:
            assert torch.equal(got, narrow_only(x))  # the int4 kernel itself
        reference = x @ weight.t() + layer.bias
        assert got.dtype == torch.float32 and (got - reference).abs().max() < 0.03 * reference.abs().max()


def _scales_mins(layer):
    """The layer's scales and mins back from its (bfloat16) scales and zeros, [N, K / 32] each."""
    scales, zeros = layer.scales_and_zeros[..., 0].t(), layer.scales_and_zeros[..., 1].t()
    return scales, zeros - 8 * scales


def test_an_lm_head_runs_wide_steps_on_its_bfloat16_copy():
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(300, 64, generator=g) / 8
    head = Int8Linear(weight)
    keep_dense(head, weight, max_rows=4, dtype=torch.bfloat16)
    assert head.dense.dtype == torch.bfloat16
    narrow, wide = torch.randn(4, 64, generator=g), torch.randn(5, 64, generator=g)
    expected = (wide.bfloat16() @ weight.bfloat16().t()).float()
    assert torch.allclose(head(wide), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(
        head(narrow), torch.ops.aten._weight_int8pack_mm(narrow.bfloat16(), head.codes, head.scales).float()
    )


@pytest.mark.skipif(not cpu_has_bf16(), reason="wide int4 steps are for CPUs with bfloat16 units")
def test_an_engine_prefills_wide_to_the_int4_kernels_logits(dequant):
    from fleetserve.config import CacheConfig, EngineConfig, ModelConfig
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.engine import LLMEngine

    def engine():
        config = EngineConfig(
            model=ModelConfig(dtype="int4", num_threads=2, compile=False), cache=CacheConfig(kv_cache_bytes=16 * 2**20)
        )
        return LLMEngine(config, progress=False)

    wide, narrow = engine(), engine()
    for module in wide.runner.model.modules():
        if isinstance(module, Int4Linear):  # wide whatever this machine chose
            module.wide_rows, module.vnni_rows = 16, None
    _int4_kernel_only(narrow)
    prompt = list(range(1000, 1120))  # one step of 120 rows
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    w, n = (_first_logprob(e, prompt, params) for e in (wide, narrow))
    assert w.token_id == n.token_id
    # both round to bfloat16 in different places (benchmarks/quality.py: the wide path's perplexity is as close to
    # float32's as the int4 kernel's); a wrong layout or scale would move these by whole units
    assert max(abs(a[1] - b[1]) for a, b in zip(w.top, n.top, strict=True)) < 0.3


def _int4_kernel_only(engine):
    """Every int4 layer on PyTorch's int4 kernel and the LM head on its codes, at every width."""
    for module in engine.runner.model.modules():
        if isinstance(module, Int4Linear):
            module.wide_rows = module.vnni_rows = None
        if isinstance(module, Int8Linear):
            module.dense = None


def _first_logprob(engine, prompt, params):
    engine.add_request(prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.logprobs:
                return out.logprobs[0]
    raise AssertionError("no logprobs came back")


needs_avx512 = pytest.mark.skipif(" avx512f" not in cpu_flags(), reason="the int8 GEMV is an AVX-512 kernel")


@needs_avx512
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_the_int8_gemv_computes_the_heads_codes_weight_in_float32(dequant, rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(320, 96, generator=g) / 8
    head = Int8Linear(weight)
    x = torch.randn(rows, 96, generator=g)
    exact = (x.double() @ (head.codes.double() * head.scales.double().unsqueeze(1)).t()).float()
    got = quantized_kernels.int8_gemv(x, quantized_kernels.interleave16(head.codes), head.scales)
    assert got.shape == (rows, 320) and got.dtype == torch.float32
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5)  # float32 sums of the exact products


@needs_avx512
def test_an_lm_head_on_the_gemv_keeps_its_bfloat16_copy_for_wide_steps(dequant):
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(160, 64, generator=g) / 8
    head = Int8Linear(weight)
    keep_dense(head, weight, max_rows=4, dtype=torch.bfloat16)
    codes, scales = head.codes.clone(), head.scales
    head.use_gemv()
    assert head.codes is None and head.codes16.shape == (10, 64, 16)
    narrow, wide = torch.randn(4, 64, generator=g), torch.randn(5, 64, generator=g)
    exact = (narrow.double() @ (codes.double() * scales.double().unsqueeze(1)).t()).float()
    assert torch.allclose(head(narrow), exact, rtol=1e-5, atol=1e-5)
    assert torch.allclose(head(wide), (wide.bfloat16() @ weight.bfloat16().t()).float(), rtol=1e-2, atol=1e-2)


needs_vnni = pytest.mark.skipif(
    not quantized_kernels.int4_vnni_available(cache_root() / "kernels"),
    reason="the int8 dot-product kernel needs AVX-512 VNNI and VBMI",
)


def vnni_reference(x, layer):
    """What int4_vnni_mm computes, in float64: each row's activations quantized to int8 per group of 32 as the
    kernel does (float32 arithmetic, rounded to nearest even), times the codes' exact integers, scaled; the group's
    zero term on the sum of its quantized activations."""
    m, k = x.shape
    xf = x.float().view(m, k // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    xq = (xf * inv).round().clamp(-127, 127).double()
    a = (amax / 127).double()
    scales, zeros = layer.scales_and_zeros[..., 0].double(), layer.scales_and_zeros[..., 1].double()  # [K / 32, N]
    codes = _codes(layer).double().view(layer.out_features, k // 32, 32)  # [N, K / 32, 32]
    dots = torch.einsum("mgj,ngj->mgn", xq, codes)  # exact integers
    zero_term = (a * xq.sum(-1, keepdim=True)) * (zeros - 8 * scales).unsqueeze(0)
    return (a * dots * scales.unsqueeze(0) + zero_term).sum(1)


def _codes(layer):
    """The layer's 4-bit codes [N, K] back from the int4 kernel's packing (see quantized_kernels.cpp)."""
    n, k = layer.out_features, layer.in_features
    packed = layer.packed.view(n // 64, k, 32)
    low, high = packed & 15, packed >> 4
    return torch.cat((low, high), -1).permute(0, 2, 1).reshape(n, k)


@needs_vnni
@pytest.mark.parametrize("shape", [(64, 32), (128, 96), (960, 576)])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 13, 130])
def test_the_vnni_kernel_computes_int8_activations_times_the_codes(dequant, shape, rows):
    n, k = shape
    layer, codes, g = random_layer(n, k, seed=rows * 7 + n)
    assert torch.equal(_codes(layer), codes)
    x = torch.randn(rows, k, generator=g)
    x[0, :32] = 0  # a group of zeros has no scale to divide by
    for xs in (x, x.bfloat16()):
        got = quantized_kernels.int4_vnni_mm(xs, layer.packed, layer.scales_and_zeros, n)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        expected = vnni_reference(xs, layer)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@needs_vnni
def test_a_layer_runs_the_vnni_kernel_only_above_its_row_count(dequant):
    layer, _, g = random_layer(128, 96, seed=21, bias=True)
    kernel_only, _, _ = random_layer(128, 96, seed=21, bias=True)
    layer.vnni_rows, layer.wide_rows = 2, 40
    for rows in (1, 2, 3, 40, 41):
        x = torch.randn(rows, 96, generator=g)
        got = layer(x)
        if rows <= 2:
            assert torch.equal(got, kernel_only(x))
        elif rows <= 40:
            expected = quantized_kernels.int4_vnni_mm(x, layer.packed, layer.scales_and_zeros, 128) + layer.bias
            assert torch.equal(got, expected)
        else:
            assert not torch.equal(got, quantized_kernels.int4_vnni_mm(x, layer.packed, layer.scales_and_zeros, 128))
        assert (got - kernel_only(x)).abs().max() < 0.03 * kernel_only(x).abs().max()


@needs_vnni
@pytest.mark.parametrize("rows", [8, 96])
def test_an_engine_on_the_vnni_kernel_scores_text_as_the_int4_kernel_does(make_engine, tokenizer, dequant, rows):
    from fleetserve.bench.quality import DEFAULT_TEXT, negative_log_likelihood

    vnni, kernel = make_engine(dtype="int4", budget=rows), make_engine(dtype="int4", budget=rows)
    for module in vnni.runner.model.modules():
        if isinstance(module, Int4Linear):
            module.wide_rows, module.vnni_rows = None, 0
    _int4_kernel_only(kernel)
    ids = tokenizer.encode(DEFAULT_TEXT.read_text(encoding="utf-8"))[:96]  # prompt chunks of ``rows`` rows
    (nll_v, n_v), (nll_k, n_k) = (negative_log_likelihood(e, ids, 96) for e in (vnni, kernel))
    assert n_v == n_k == 95
    # int8 activations against the int4 kernel's bfloat16 ones: within 1% of its perplexity (benchmarks/quality.py
    # measures both on the whole text); a wrong layout or scale would cost whole nats
    assert abs(nll_v / n_v - nll_k / n_k) < 0.01


@needs_vnni
@pytest.mark.parametrize("rows", [1, 5, 8, 19])
def test_the_heads_vnni_kernel_computes_int8_activations_times_its_codes(dequant, rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(160, 96, generator=g) / 8
    head, plain = Int8Linear(weight), Int8Linear(weight)
    codes, scales = head.codes.clone(), head.scales.float()
    head.use_kernel("vnni")
    assert head.codes is None and head.codes4.shape == (10, 24, 16, 4)
    x = torch.randn(rows, 96, generator=g)
    xf = x.view(rows, 3, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    xq = (xf * (torch.tensor(127.0) / amax)).round().double()
    dots = torch.einsum("mgj,ngj->mgn", xq, codes.double().view(160, 3, 32))  # exact integers
    expected = ((amax / 127).double() * dots).sum(1) * scales.double()
    got = head(x)
    assert got.shape == (rows, 160) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (got - plain(x)).abs().max() < 0.03 * plain(x).abs().max()  # PyTorch's int8 kernel, bfloat16 inputs
