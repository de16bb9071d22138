"""Builds the decoder for a layer range and fills it from a Hugging Face folder's safetensors.

With ``weights="int4"`` the layers whose checkpoint codes are 4-bit run on those codes (``quantized``), the token
table and a tied LM head on its 8-bit ones; everything else is filled from the float weights as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from fleetserve.engine.models.linear import Linear
from fleetserve.engine.models.llama import LlamaModel, rope_inv_freq
from fleetserve.engine.models.quantized import Int4Linear, Int8Embedding, Int8Linear, keep_dense
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
    wide_above: int | None = None,
    head_dense_above: int | None = None,
    head_kernel: str = "int8",
    vnni_above: int | None = None,
) -> LlamaModel:
    """Build the decoder for layers [layer_start, layer_end) (with the LM head when ``lm_head``, or when None and the
    range ends at the last layer) and fill it from the folder's safetensors.

    ``dtype`` is the model's activations and float weights; ``weights="int4"`` runs the layers on the checkpoint's
    4-bit codes where it has them (see the module's doc); with ``dense_above`` those layers also keep float32
    copies for steps of more rows than that; with ``wide_above`` they de-quantize to bfloat16 for steps of more
    rows than that, and with ``head_dense_above`` an LM head on codes keeps a bfloat16 copy for those; with
    ``head_kernel`` an int8 LM head runs its other steps on that kernel (``Int8Linear.use_kernel``); with ``vnni_above`` int4 layers run steps of
    more rows than that (up to ``wide_above``) on our int8 dot-product kernel."""
    index = _tensor_index(model_dir)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise UnsupportedModelError(f"weights of {model_dir} lack tensor {name!r}")
        f = index[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name)

    head = (
        "model.embed_tokens.weight" if arch.tie_word_embeddings or "lm_head.weight" not in index else "lm_head.weight"
    )
    with torch.device("meta"):
        model = LlamaModel(arch, layer_start, layer_end, lm_head).to(dtype)  # on meta: no memory yet
    if weights == "int4":
        _use_codes(model, QuantizedTensors(model_dir), get, head, dtype)
    _materialize(model, device)

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise UnsupportedModelError(f"tensor shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(value.to(dtype))

    def fill(module: torch.nn.Module, names: list[str]) -> None:
        """A float layer takes the named tensors (stacked along rows); one on codes may keep them as its copy."""
        if isinstance(module, (Linear, torch.nn.Embedding)):
            put(module.weight, torch.cat([get(n) for n in names], dim=0))
        elif dense_above is not None and isinstance(module, (Int4Linear, Int8Linear)):
            keep_dense(module, torch.cat([get(n) for n in names], dim=0), dense_above)

    with torch.no_grad():
        if model.embed is not None:
            fill(model.embed, ["model.embed_tokens.weight"])
        for local, layer in enumerate(model.layers):
            p = f"model.layers.{layer_start + local}."
            put(layer.input_norm, get(p + "input_layernorm.weight"))
            put(layer.post_attn_norm, get(p + "post_attention_layernorm.weight"))
            for attr, names in layer_tensors(p).items():
                fill(getattr(layer, attr), names)
            if isinstance(layer.qkv, Linear) and layer.qkv.bias is not None:
                put(layer.qkv.bias, torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0))
        if model.has_lm_head:
            put(model.norm, get("model.norm.weight"))
            if (
                head != "lm_head.weight"
                and isinstance(model.embed, torch.nn.Embedding)
                and isinstance(model.lm_head, Linear)
            ):
                model.lm_head.weight = model.embed.weight  # one tensor, as in the checkpoint
            else:
                fill(model.lm_head, [head])
        _take_kernel_paths(model, lambda: get(head), wide_above, head_dense_above, head_kernel, vnni_above)
    model.inv_freq = rope_inv_freq(arch).to(device)  # to_empty left the buffer uninitialised
    return model.eval()


def _take_kernel_paths(
    model: LlamaModel,
    head_weight: Callable[[], torch.Tensor],
    wide_above: int | None,
    head_dense_above: int | None,
    head_kernel: str,
    vnni_above: int | None,
) -> None:
    """Int4 layers de-quantize for steps of more than ``wide_above`` rows and run steps of more than
    ``vnni_above`` (up to that) on int8 dot products; an LM head on codes keeps a bfloat16 copy for steps of more
    than ``head_dense_above``, and an int8 one runs the others on ``head_kernel``."""
    if model.has_lm_head and isinstance(model.lm_head, Int8Linear):
        model.lm_head.use_kernel(head_kernel)
    if head_dense_above is not None and model.has_lm_head and isinstance(model.lm_head, (Int4Linear, Int8Linear)):
        keep_dense(model.lm_head, head_weight(), head_dense_above, torch.bfloat16)
    for module in model.layers.modules():
        if isinstance(module, Int4Linear):
            module.wide_rows, module.vnni_rows = wide_above, vnni_above


def layer_tensors(prefix: str) -> dict[str, list[str]]:
    """A decoder layer's linears and the checkpoint tensors each stacks along its rows (q/k/v and gate/up fused)."""
    return {
        "qkv": [prefix + f"self_attn.{n}_proj.weight" for n in "qkv"],
        "o_proj": [prefix + "self_attn.o_proj.weight"],
        "gate_up": [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"],
        "down": [prefix + "mlp.down_proj.weight"],
    }


def _use_codes(
    model: LlamaModel, codes: QuantizedTensors, get: Callable[[str], torch.Tensor], head: str, dtype: torch.dtype
) -> None:
    """Swap in layers that run on the checkpoint's codes wherever it has them: 4-bit linears, the 8-bit token table,
    and an LM head (``head``: its tensor, the table's when tied) re-quantized to int8 from 8-bit codes. Runs while
    the model is still on the meta device, so the float weights these replace never take memory."""
    table = "model.embed_tokens.weight"
    if model.embed is not None and codes.kinds.get(table) == "Q8_0":
        model.embed = Int8Embedding(codes.part([table], "codes"), codes.part([table], "scales"), dtype)
    for local, layer in enumerate(model.layers):
        p = f"model.layers.{model.layer_start + local}."
        for attr, names in layer_tensors(p).items():
            if not codes.four_bit(*names):
                continue
            bias = None
            if attr == "qkv" and layer.qkv.bias is not None:
                bias = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
            setattr(layer, attr, codes.int4_linear(names, bias))
    if model.has_lm_head:
        if codes.kinds.get(head) == "Q8_0":
            model.lm_head = Int8Linear.from_q8(codes.part([head], "codes"), codes.part([head], "scales"))
        elif codes.four_bit(head):
            model.lm_head = codes.int4_linear([head], None)


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
