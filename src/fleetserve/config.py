"""Typed settings, one class per concern, composed into EngineConfig and validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.errors import InvalidRequestError

MiB = 1024 * 1024


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 512 * MiB
    """Memory given to KV blocks (all layers this engine runs); sets the number of blocks."""
    enable_prefix_caching: bool = True
    """Keep freed full blocks keyed by a hash of their prefix so later requests skip that prefill."""

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise InvalidRequestError(f"block_size must be in 1..1024, got {self.block_size}", "block_size")
        if self.kv_cache_bytes <= 0:
            raise InvalidRequestError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}", "kv_cache_bytes")


@dataclass
class SchedulerConfig:
    """Continuous batching: what one engine step may hold."""

    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens first, prefill chunks with the rest."""
    max_num_seqs: int = 64
    """Most sequences running at once."""

    def validate(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be >= 1", "max_num_batched_tokens")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be >= 1", "max_num_seqs")


@dataclass
class ModelConfig:
    """Which model to load, where, and how."""

    model: str = "smollm2-135m-instruct"
    """A known model name, a Hugging Face folder (config.json + safetensors), or a .gguf file."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda[:N]."""
    dtype: str = "auto"
    """auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16 or float16."""
    layer_start: int = 0
    """First decoder layer this engine runs (pipeline stages run a range)."""
    layer_end: int | None = None
    """One past the last decoder layer this engine runs; None means the last layer."""
    max_model_len: int | None = None
    """Context window in tokens; None takes the model's own."""
    num_threads: int | None = None
    """torch CPU threads for this engine; None leaves torch's default."""

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "dtype")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidRequestError(f"device must be auto, cpu or cuda[:N], got {self.device!r}", "device")
        if self.layer_start < 0 or (self.layer_end is not None and self.layer_end <= self.layer_start):
            raise InvalidRequestError(
                f"layer range [{self.layer_start}, {self.layer_end}) is empty or negative", "layer_start"
            )


@dataclass
class EngineConfig:
    """Everything one engine needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    """Seed of the generator used by requests that bring none."""

    def validate(self) -> EngineConfig:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        return self


# -- layering: defaults < config file < environment < command-line flags ------------------------------------

ENV_PREFIX = "FLEETSERVE_"


def load_config_file(path: str) -> dict:
    """Read a YAML (or JSON) config file: option names as keys, at the top level or under a command's name."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise InvalidRequestError(f"cannot read config file {path}: {exc.strerror}", "config") from None
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"config file {path} is not valid YAML: {exc}", "config") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"config file {path} must hold a mapping of option names to values", "config")
    return data


def layered_options(
    command: str, options: dict[str, object], explicit: set[str], file_data: dict, env: dict[str, str], parse
) -> dict[str, object]:
    """Merge one command's options: flags given on the command line win, then FLEETSERVE_* variables, then the
    file's section for the command, then the file's top level, then the defaults already in ``options``.

    ``parse(name, text)`` converts an environment string to the option's type. Unknown keys in the file's parts
    that apply to this command are errors naming the valid ones.
    """
    known = set(options)
    commands = {"generate", "worker", "gateway", "up", "bench", "models", "nodes"}
    top = {k: v for k, v in file_data.items() if k not in commands}
    section = file_data.get(command) or {}
    if not isinstance(section, dict):
        raise InvalidRequestError(f"config section {command!r} must be a mapping", "config")
    for where, part in (("top level", top), (f"section {command!r}", section)):
        unknown = sorted(set(part) - known - ({"config"} if where == "top level" else set()))
        # Top-level keys may belong to other commands; only a command's own section must be exact.
        if unknown and where != "top level":
            raise InvalidRequestError(
                f"unknown option(s) {', '.join(unknown)} in the config file's {where}; "
                f"valid: {', '.join(sorted(known))}",
                "config",
            )
    merged = dict(options)
    for name in known:
        if name in explicit:
            continue
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            merged[name] = parse(name, env[env_name])
        elif name in section:
            merged[name] = section[name]
        elif name in top:
            merged[name] = top[name]
    return merged
