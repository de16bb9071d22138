"""Hugging Face folders of each supported architecture (tiny random models saved by transformers) load and
produce transformers' logits and greedy tokens; conversion helpers invert llama.cpp's layout."""

import json

import numpy as np
import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.model_files.gguf_convert import hf_name, undo_rotary_permutation

pytestmark = pytest.mark.reference

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_models():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama-untied-llama3-rope": LlamaConfig(
            **TINY,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "llama-tied-linear-rope": LlamaConfig(
            **TINY, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}
        ),
        "qwen2-bias": Qwen2Config(**TINY, tie_word_embeddings=True),
        "mistral": MistralConfig(**TINY, sliding_window=None),
    }


@pytest.fixture(scope="module", params=list(tiny_models()))
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_models()[request.param]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random weights with some spread, so argmaxes are not near-ties
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def test_tiny_model_matches_transformers(tiny, make_engine):
    name, folder, hf = tiny
    engine = make_engine(model=str(folder), kv_cache_bytes=4 * 2**20)
    assert engine.arch.qkv_bias == (name == "qwen2-bias")
    prompts = [[5, 17, 42, 99, 7, 250, 3], list(range(10, 60))]
    # next-token logits of each prompt
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=1), request_id=f"l{i}")
    plan = engine.scheduler.schedule()
    logits, _ = engine.runner.logits(plan, engine.runner.forward(plan))
    for i in range(len(prompts)):
        engine.abort(f"l{i}")
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1]
            assert torch.allclose(logits[i], ref, atol=1e-4, rtol=1e-4), name
    # greedy continuation, batched, equals transformers one by one
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, min_tokens=12))
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
            )[0, len(p) :].tolist()
        assert got == ref, name


def test_engine_runs_in_bfloat16(tiny, make_engine):
    _, folder, _ = tiny
    engine = make_engine(model=str(folder), kv_cache_bytes=2**20, dtype="bfloat16")
    assert engine.runner.dtype == torch.bfloat16
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out) == 4 and all(0 <= t < 300 for t in out)
    rid = engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=2), retain_kv=True)
    while engine.has_unfinished():
        engine.step()
    transfer = engine.export_kv(rid)
    # 5 prompt tokens + the first output have KV; layers x tokens x (k, v) x kv heads x head dim x 2 bytes
    assert transfer.num_tokens == 6
    assert transfer.dtype == "bfloat16" and len(transfer.data) == 3 * 6 * 2 * 2 * 16 * 2


def test_undo_rotary_permutation_inverts_llama_cpp_layout():
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: interleave each head's two rotary halves
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(undo_rotary_permutation(permuted, heads), w)


def test_gguf_tensor_names():
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_config_written_from_gguf(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 3, 64)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
