"""Builds the decoder for a layer range and fills it from a Hugging Face folder's safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from fleetserve.engine.models.llama import LlamaModel, rope_inv_freq
from fleetserve.errors import UnsupportedModelError
from fleetserve.model_files.arch import ModelArch


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no .safetensors weights")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                index[name] = f
    return index


def load_model(
    model_dir: Path,
    arch: ModelArch,
    layer_start: int = 0,
    layer_end: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    lm_head: bool | None = None,
) -> LlamaModel:
    """Build the decoder for layers [layer_start, layer_end) (with the LM head when ``lm_head``, or when None and the
    range ends at the last layer) and fill it from the folder's safetensors."""
    with torch.device("meta"):
        model = LlamaModel(arch, layer_start, layer_end, lm_head).to(dtype)  # on meta: no memory yet
    _materialize(model, device)
    index = _tensor_index(model_dir)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise UnsupportedModelError(f"weights of {model_dir} lack tensor {name!r}")
        f = index[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise UnsupportedModelError(f"tensor shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(value.to(dtype))

    with torch.no_grad():
        if model.embed is not None:
            put(model.embed.weight, get("model.embed_tokens.weight"))
        for local, layer in enumerate(model.layers):
            p = f"model.layers.{layer_start + local}."
            put(layer.input_norm, get(p + "input_layernorm.weight"))
            put(layer.post_attn_norm, get(p + "post_attention_layernorm.weight"))
            qkv = [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            put(layer.qkv.weight, torch.cat(qkv, dim=0))
            if layer.qkv.bias is not None:
                put(layer.qkv.bias, torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0))
            put(layer.o_proj.weight, get(p + "self_attn.o_proj.weight"))
            put(layer.gate_up.weight, torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], 0))
            put(layer.down.weight, get(p + "mlp.down_proj.weight"))
        if model.has_lm_head:
            put(model.norm, get("model.norm.weight"))
            tied = arch.tie_word_embeddings or "lm_head.weight" not in index
            if tied and model.embed is not None:
                model.lm_head.weight = model.embed.weight  # one tensor, as in the checkpoint
            else:
                put(model.lm_head.weight, get("model.embed_tokens.weight" if tied else "lm_head.weight"))
    model.inv_freq = rope_inv_freq(arch).to(device)  # to_empty left the buffer uninitialised
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device | str) -> None:
    """Give every parameter and buffer of a model built on the meta device uninitialised memory on ``device``.

    Module.to_empty does the same through empty_like, whose meta-tensor path imports sympy (most of a second of a
    worker's start); torch.empty with the shape does not."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
