"""Weight formats: a GGUF's quantized blocks read back as codes, scales and mins equal to gguf's own de-quantizer;
the int4 and int8 layers compute what their codes stand for; the format choice refuses what it cannot run."""

import numpy as np
import pytest
import torch

from fleetserve.engine.models.quantized import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    int4_kernels_work,
    int4_weight,
    int8_weight,
)
from fleetserve.engine.weight_format import activation_dtype, choose_weight_format
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files.gguf_convert import quantized_blocks


def random_blocks(kind: str, rows: int, groups: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF blocks with sane float16 scales (and mins) and random codes."""
    rng = np.random.default_rng(seed)
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = rng.integers(0, 256, (rows * groups, size), dtype=np.uint8)
    blocks[:, 0:2] = rng.uniform(0.001, 0.1, rows * groups).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if kind == "Q4_1":
        blocks[:, 2:4] = rng.uniform(-1, 0, rows * groups).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, groups * size)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_blocks_equal_ggufs_dequantizer(kind):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, groups = 6, 4
    data = random_blocks(kind, rows, groups)
    expected = np.asarray(dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32).reshape(rows, groups * 32)
    parts = {k: torch.from_numpy(v) for k, v in quantized_blocks(data, kind, rows).items()}
    if kind == "Q8_0":
        assert parts["codes"].dtype == torch.int8 and "mins" not in parts
        got = int8_weight(parts["codes"], parts["scales"])
    else:
        assert parts["codes"].dtype == torch.uint8 and int(parts["codes"].max()) <= 15
        got = int4_weight(parts["codes"], parts["scales"], parts["mins"])
    assert parts["scales"].shape == (rows, groups)
    assert torch.equal(got, torch.from_numpy(expected))  # exact, not close


needs_kernels = pytest.mark.skipif(not int4_kernels_work(), reason="this PyTorch has no CPU int4/int8 kernels")


@needs_kernels
def test_int4_linear_computes_its_codes_weight_to_bfloat16_precision():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (96, 128), generator=g, dtype=torch.uint8)
    scales, mins = torch.rand(96, 4, generator=g) / 16, -torch.rand(96, 4, generator=g) / 2
    bias = torch.randn(96, generator=g)
    layer = Int4Linear(codes, scales, mins, bias)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 128, generator=g)
        reference = x @ int4_weight(codes, scales, mins).t() + bias
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 96)
        # bfloat16 keeps 8 significant bits: activations, scales, zeros and the output each round once
        assert (got - reference).abs().max() < 0.03 * reference.abs().max()
    assert layer.packed.numel() == 96 * 128 // 2  # half a byte per weight


@needs_kernels
def test_int8_linear_and_embedding():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (50, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(50, 2, generator=g) / 100
    table = Int8Embedding(codes, scales, torch.float32)
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(table(ids), int8_weight(codes, scales)[ids])  # lookups de-quantize exactly
    head = Int8Linear(table.weight())
    x = torch.randn(4, 64, generator=g)
    reference = x @ table.weight().t()
    assert (head(x) - reference).abs().max() < 0.03 * reference.abs().max()
    assert head.codes.dtype == torch.int8 and head.scales.shape == (50,)


def test_format_choice_refuses_what_it_cannot_run(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "float32"}')
    cpu = torch.device("cpu")
    with pytest.raises(InvalidRequestError, match="no 4-bit layer codes"):
        choose_weight_format("int4", cpu, tmp_path, None)
    with pytest.raises(InvalidRequestError, match="CPU only"):
        choose_weight_format("int4", torch.device("cuda"), tmp_path, None)
    with pytest.raises(InvalidRequestError, match="dtype must be one of"):
        choose_weight_format("int3", cpu, tmp_path, None)
    assert choose_weight_format("auto", cpu, tmp_path, None).name == "float32"  # a float32 checkpoint
    assert choose_weight_format("bfloat16", cpu, tmp_path, None).activations == torch.bfloat16
    assert activation_dtype("int4", cpu) == torch.float32 and activation_dtype("auto", cpu) == torch.float32


def test_auto_takes_int4_where_it_wins_and_float32_copies_above():
    from fleetserve.engine.weight_format import _int4_or_float32

    everywhere = _int4_or_float32({1: (1.0, 3.0), 4: (2.0, 4.0), 16: (5.0, 6.0), 64: (9.0, 10.0)})
    assert (everywhere.name, everywhere.dense_above) == ("int4", None)
    decodes_only = _int4_or_float32({1: (1.0, 3.0), 4: (2.0, 4.0), 16: (7.0, 6.0), 64: (30.0, 10.0)})
    assert (decodes_only.name, decodes_only.dense_above) == ("int4", 4)
    assert "up to 4 rows" in decodes_only.reason and "16 rows 7.0/6.0 ms" in decodes_only.reason
    nowhere = _int4_or_float32({1: (4.0, 3.0), 4: (2.0, 4.0), 16: (5.0, 6.0), 64: (9.0, 10.0)})
    assert nowhere.name == "float32"


@needs_kernels
def test_a_layer_with_a_dense_copy_runs_big_steps_on_it():
    from fleetserve.engine.models.quantized import keep_dense

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 64), generator=g, dtype=torch.uint8)
    scales, mins = torch.rand(64, 2, generator=g) / 16, -torch.rand(64, 2, generator=g) / 2
    layer = Int4Linear(codes, scales, mins, None)
    weight = int4_weight(codes, scales, mins)
    keep_dense(layer, weight, max_rows=4)
    small, big = torch.randn(4, 64, generator=g), torch.randn(5, 64, generator=g)
    assert torch.allclose(layer(big), big @ weight.t(), atol=1e-5)  # float32 arithmetic: no bfloat16 rounding
    assert not torch.allclose(layer(small), small @ weight.t(), atol=1e-5)  # the int4 kernel's bfloat16 inputs


def test_a_wide_path_takes_over_from_the_first_row_count_where_it_wins():
    from fleetserve.engine.weight_format import narrow_wins_up_to

    assert narrow_wins_up_to({4: (1.0, 3.0), 16: (5.0, 6.0), 64: (9.0, 7.0), 256: (40.0, 20.0)}) == 16
    assert narrow_wins_up_to({4: (1.0, 3.0), 16: (5.0, 6.0)}) is None
    assert narrow_wins_up_to({4: (4.0, 3.0), 16: (5.0, 6.0)}) == 0


@needs_kernels
def test_an_int8_head_from_q8_codes_equals_one_from_their_float_weight():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (Int8Linear.SLICE + 100, 64), generator=g, dtype=torch.int8)  # two slices
    scales = torch.rand(codes.shape[0], 2, generator=g) / 64
    from_codes, from_float = Int8Linear.from_q8(codes, scales), Int8Linear(int8_weight(codes, scales))
    assert torch.equal(from_codes.codes, from_float.codes) and torch.equal(from_codes.scales, from_float.scales)
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(from_codes(x), from_float(x))


def _resident_mib() -> float:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_kv_tensor_takes_memory_as_it_is_written():
    from fleetserve.engine.model_runner import zeros_on_first_touch

    before = _resident_mib()
    kv = zeros_on_first_touch((4096, 2, 4, 2048), torch.float32, torch.device("cpu"))  # 256 MiB
    assert kv.shape == (4096, 2, 4, 2048) and kv.dtype == torch.float32 and kv.is_contiguous()
    assert _resident_mib() - before < 32
    assert float(kv[::512].abs().sum()) == 0.0  # zeros where never written
    kv[:2048] = 1.0
    assert _resident_mib() - before > 100  # half of it written: resident now
    assert float(kv[2047, 1, 3, 2047]) == 1.0 and float(kv[2048, 0, 0, 0]) == 0.0


def test_processes_that_ask_together_share_one_measurement(tmp_path, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from fleetserve.engine.weight_format import _remembered

    monkeypatch.setenv("FLEETSERVE_CACHE", str(tmp_path))
    calls, measuring = [], threading.Event()

    def measure():
        calls.append(1)
        measuring.set()
        time.sleep(0.3)
        return {1: (1.0, 2.0)}

    with ThreadPoolExecutor(2) as pool:  # separate opens of the lock file exclude each other as processes do
        first = pool.submit(_remembered, "key", measure)
        assert measuring.wait(5)
        second = pool.submit(_remembered, "key", measure)
        assert first.result() == second.result() == {"1": [1.0, 2.0]}
    assert len(calls) == 1  # the second waited for the first's result instead of measuring beside it
