"""Model files on disk: known model names, their architecture and kind, GGUF conversion and zip unpacking into a
cached folder (no torch)."""

from fleetserve.model_files.arch import ModelArch
from fleetserve.model_files.catalog import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    KNOWN_MODELS,
    cache_root,
    list_models,
    load_arch,
    model_arch,
    model_kind,
    prepare_model_dir,
    resolve_source,
)

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ModelArch",
    "cache_root",
    "list_models",
    "load_arch",
    "model_arch",
    "model_kind",
    "prepare_model_dir",
    "resolve_source",
]
