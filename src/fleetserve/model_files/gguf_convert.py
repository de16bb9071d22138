"""GGUF to Hugging Face folder: de-quantize the weights once, write config.json, safetensors and tokenizer files.

Beside the de-quantized float32 weights (``model.safetensors``), the folder keeps the file's own 4-bit and 8-bit
codes in ``quantized.safetensors`` (see ``quantized_blocks``), so an engine can run on the checkpoint's integers
as they are instead of on float32 copies of them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fleetserve.errors import UnsupportedModelError

# GGUF architecture -> (HF architecture, whether llama.cpp permuted q/k rows for its rotary layout).
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a GGUF tensor, or None for tensors we do not use (rope tables)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
    return None


def undo_rotary_permutation(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves in q/k rows; put them back in the Hugging Face order."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


QUANTIZED_FILE = "quantized.safetensors"
"""Per quantized tensor NAME: ``NAME.codes`` [rows, cols] (uint8 for 4-bit codes 0..15, int8 for 8-bit ones) and
``NAME.scales`` float32 [rows, cols / 32], plus ``NAME.mins`` float32 for 4-bit ones, such that within each group
of 32 columns value = scale * code + min (8-bit: scale * code). The metadata maps NAME to the GGUF type."""

# bytes of one block of 32 values: float16 scale (and float16 min for Q4_1), then the codes
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def quantized_blocks(data: np.ndarray, kind: str, rows: int) -> dict[str, np.ndarray]:
    """A Q4_0, Q4_1 or Q8_0 tensor's raw blocks as codes, scales and mins (see QUANTIZED_FILE); values equal
    gguf's de-quantizer's exactly in float32."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, -1, _BLOCK_BYTES[kind])  # [rows, groups, bytes]
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8)
        return {"codes": codes.reshape(rows, -1), "scales": scales}
    packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    # a block's 16 bytes hold codes 0..15 in their low nibbles and codes 16..31 in their high ones
    codes = np.concatenate((packed & 0x0F, packed >> 4), axis=-1).reshape(rows, -1)
    # Q4_0: value = scale * (code - 8)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * scales
    return {"codes": np.ascontiguousarray(codes), "scales": scales, "mins": mins}


def open_reader(gguf_path: str | Path) -> Any:
    """A GGUF reader over the file (memory-mapped: reading metadata touches no tensor data)."""
    import gguf

    return gguf.GGUFReader(str(gguf_path))


def hf_config(reader: Any) -> dict[str, Any]:
    """config.json contents from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch][0]],
        "model_type": arch,
        "vocab_size": int(a("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling_type = a("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise UnsupportedModelError(f"unsupported GGUF rope scaling {scaling_type!r}")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    return config


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished conversion into place. Processes converting the same file at once (the workers of
    `fleetserve up` on a fresh machine) race here: the first complete folder wins and is never replaced while
    another process may be reading it; later ones are discarded."""
    if out_dir.exists() and not (out_dir / "model.safetensors").exists():
        shutil.rmtree(out_dir, ignore_errors=True)  # a leftover without weights: not in use by anyone
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "model.safetensors").exists():
            raise


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """De-quantize ``gguf_path`` into a Hugging Face folder at ``out_dir`` (written atomically); return it."""
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    from fleetserve.text.gguf_tokenizer import write_tokenizer_files

    out_dir = Path(out_dir)
    reader = open_reader(gguf_path)
    config = hf_config(reader)
    permute = _ARCHITECTURES[config["model_type"]][1]
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        tensors: dict[str, np.ndarray] = {}
        quantized: dict[str, np.ndarray] = {}
        kinds: dict[str, str] = {}
        for t in tqdm(
            reader.tensors, desc=f"de-quantizing {Path(gguf_path).name}", unit="tensor", disable=not progress
        ):
            name = hf_name(t.name)
            if name is None:
                continue
            heads = None
            if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = config["num_attention_heads"]
            elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = config["num_key_value_heads"]
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
            tensors[name] = np.ascontiguousarray(w if heads is None else undo_rotary_permutation(w, heads))
            kind = t.tensor_type.name
            if kind in _BLOCK_BYTES and w.ndim == 2:
                for part, value in quantized_blocks(t.data, kind, w.shape[0]).items():
                    value = value if heads is None else undo_rotary_permutation(value, heads)
                    quantized[f"{name}.{part}"] = np.ascontiguousarray(value)
                kinds[name] = kind
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if quantized:
            save_file(quantized, str(tmp / QUANTIZED_FILE), metadata={"format": "pt", **kinds})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(reader, tmp)
        (tmp / "fleetserve-source.json").write_text(json.dumps({"gguf": os.path.abspath(gguf_path)}))
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
