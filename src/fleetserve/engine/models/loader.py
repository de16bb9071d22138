"""Builds the decoder for a layer range and fills it from a Hugging Face folder's safetensors.

With ``weights="int4"`` the layers whose checkpoint codes are 4-bit run on those codes (``quantized``), the token
table and a tied LM head on its 8-bit ones; everything else is filled from the float weights as usual.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from fleetserve.engine.models.linear import Linear
from fleetserve.engine.models.llama import LlamaModel, rope_inv_freq
from fleetserve.engine.models.quantized import Int4Linear, Int8Embedding, Int8Linear, int8_weight, keep_dense
from fleetserve.errors import UnsupportedModelError
from fleetserve.model_files.arch import ModelArch
from fleetserve.model_files.gguf_convert import QUANTIZED_FILE

FOUR_BIT = ("Q4_0", "Q4_1")


class QuantizedTensors:
    """A converted GGUF's integer codes: per tensor name, its GGUF type and codes, scales and mins."""

    def __init__(self, model_dir: Path):
        path = Path(model_dir) / QUANTIZED_FILE
        self.handle = safe_open(str(path), framework="pt") if path.exists() else None
        meta = (self.handle.metadata() or {}) if self.handle is not None else {}
        self.kinds = {name: kind for name, kind in meta.items() if name != "format"}

    def four_bit(self, *names: str) -> bool:
        return bool(names) and all(self.kinds.get(n) in FOUR_BIT for n in names)

    def part(self, names: list[str], part: str) -> torch.Tensor:
        """One part (codes, scales or mins) of tensors stacked along their rows, as the fused layers hold them."""
        return torch.cat([self.handle.get_tensor(f"{n}.{part}") for n in names], dim=0)

    def int4_linear(self, names: list[str], bias: torch.Tensor | None) -> Int4Linear:
        return Int4Linear(self.part(names, "codes"), self.part(names, "scales"), self.part(names, "mins"), bias)


def has_four_bit_layers(model_dir: Path) -> bool:
    """Whether the folder keeps 4-bit codes of its layer weights (a converted Q4_0/Q4_1 GGUF)."""
    return any(k in FOUR_BIT for k in QuantizedTensors(model_dir).kinds.values())


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
    weights: str | None = None,
    dense_above: int | None = None,
) -> LlamaModel:
    """Build the decoder for layers [layer_start, layer_end) (with the LM head when ``lm_head``, or when None and the
    range ends at the last layer) and fill it from the folder's safetensors.

    ``dtype`` is the model's activations and float weights; ``weights="int4"`` runs the layers on the checkpoint's
    4-bit codes where it has them (see the module's doc); with ``dense_above`` those layers also keep float32
    copies for steps of more rows than that."""
    index = _tensor_index(model_dir)
    with torch.device("meta"):
        model = LlamaModel(arch, layer_start, layer_end, lm_head).to(dtype)  # on meta: no memory yet
    if weights == "int4":
        _use_codes(model, QuantizedTensors(model_dir), index, arch, dtype)
    _materialize(model, device)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise UnsupportedModelError(f"weights of {model_dir} lack tensor {name!r}")
        f = index[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    def put(param: torch.Tensor | None, value: torch.Tensor) -> None:
        if param is None:  # the module runs on the checkpoint's codes
            return
        if param.shape != value.shape:
            raise UnsupportedModelError(f"tensor shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(value.to(dtype))

    def float_weight(module: torch.nn.Module) -> torch.Tensor | None:
        return module.weight if isinstance(module, (Linear, torch.nn.Embedding)) else None

    def dense_copy(module: torch.nn.Module, *names: str) -> None:
        if dense_above is not None and isinstance(module, (Int4Linear, Int8Linear)):
            keep_dense(module, torch.cat([get(n) for n in names], dim=0), dense_above)

    with torch.no_grad():
        if model.embed is not None:
            put(float_weight(model.embed), get("model.embed_tokens.weight"))
        for local, layer in enumerate(model.layers):
            p = f"model.layers.{layer_start + local}."
            put(layer.input_norm, get(p + "input_layernorm.weight"))
            put(layer.post_attn_norm, get(p + "post_attention_layernorm.weight"))
            if isinstance(layer.qkv, Linear):
                put(layer.qkv.weight, torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0))
                if layer.qkv.bias is not None:
                    put(layer.qkv.bias, torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0))
            put(float_weight(layer.o_proj), get(p + "self_attn.o_proj.weight"))
            if isinstance(layer.gate_up, Linear):
                gate_up = [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
                put(layer.gate_up.weight, torch.cat(gate_up, 0))
            put(float_weight(layer.down), get(p + "mlp.down_proj.weight"))
            dense_copy(layer.qkv, *(p + f"self_attn.{n}_proj.weight" for n in "qkv"))
            dense_copy(layer.o_proj, p + "self_attn.o_proj.weight")
            dense_copy(layer.gate_up, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            dense_copy(layer.down, p + "mlp.down_proj.weight")
        if model.has_lm_head:
            put(model.norm, get("model.norm.weight"))
            tied = arch.tie_word_embeddings or "lm_head.weight" not in index
            if tied and isinstance(model.embed, torch.nn.Embedding) and isinstance(model.lm_head, Linear):
                model.lm_head.weight = model.embed.weight  # one tensor, as in the checkpoint
            else:
                put(float_weight(model.lm_head), get("model.embed_tokens.weight" if tied else "lm_head.weight"))
            dense_copy(model.lm_head, "model.embed_tokens.weight" if tied else "lm_head.weight")
    model.inv_freq = rope_inv_freq(arch).to(device)  # to_empty left the buffer uninitialised
    return model.eval()


def _use_codes(
    model: LlamaModel, codes: QuantizedTensors, index: dict[str, Path], arch: ModelArch, dtype: torch.dtype
) -> None:
    """Swap in layers that run on the checkpoint's codes wherever it has them: 4-bit linears, the 8-bit token table,
    and an LM head re-quantized to int8 from 8-bit (or tied to the table's) codes. Runs while the model is still on
    the meta device, so the float weights these replace never take memory."""
    kinds = codes.kinds
    if model.embed is not None and kinds.get("model.embed_tokens.weight") == "Q8_0":
        table = "model.embed_tokens.weight"
        model.embed = Int8Embedding(codes.part([table], "codes"), codes.part([table], "scales"), dtype)
    for local, layer in enumerate(model.layers):
        p = f"model.layers.{model.layer_start + local}."
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        if codes.four_bit(*qkv):
            bias = None
            if layer.qkv.bias is not None:
                bias = torch.cat([_read(index, p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
            layer.qkv = codes.int4_linear(qkv, bias)
        if codes.four_bit(p + "self_attn.o_proj.weight"):
            layer.o_proj = codes.int4_linear([p + "self_attn.o_proj.weight"], None)
        gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        if codes.four_bit(*gate_up):
            layer.gate_up = codes.int4_linear(gate_up, None)
        if codes.four_bit(p + "mlp.down_proj.weight"):
            layer.down = codes.int4_linear([p + "mlp.down_proj.weight"], None)
    if model.has_lm_head:
        tied = arch.tie_word_embeddings or "lm_head.weight" not in index
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        if kinds.get(head) == "Q8_0":
            model.lm_head = Int8Linear(int8_weight(codes.part([head], "codes"), codes.part([head], "scales")))
        elif codes.four_bit(head):
            model.lm_head = codes.int4_linear([head], None)


def _read(index: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(index[name]), framework="pt") as st:
        return st.get_tensor(name)


def _materialize(model: torch.nn.Module, device: torch.device | str) -> None:
    """Give every parameter and buffer of a model built on the meta device uninitialised memory on ``device``.

    Module.to_empty does the same through empty_like, whose meta-tensor path imports sympy (most of a second of a
    worker's start); torch.empty with the shape does not."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
