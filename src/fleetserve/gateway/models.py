"""The gateway's model registry: what it knows of each model it serves, from its config and from its workers.

A model is *configured* when the model config names it, and *learned* when only a registering worker told the
gateway about it. Configured models carry the operator's settings (default sampling parameters, balancing policy
and its options); the workers fill in what the config left empty (version, architecture, layers, dtype, context
window).

Accepted config shapes, as read from JSON or YAML (``ModelRegistry.from_config`` / ``ModelRegistry.load``)::

    # a list of models, each with its name
    - {name: smollm2, policy: least-connections, temperature: 0.7}

    # a mapping of name -> settings (also the shape of a ``model_configs.json``); None means "no settings"
    smollm2: {version: "1", path: /models/smollm2, layers: 30, max_context: 8192,
              default_params: {temperature: 0.7, top_p: 0.9, max_tokens: 256}}

    # either of the above under a top-level ``models`` key
    models: [...]

Keys of one model (aliases after the slash): name, version, source/path, architecture, num_layers/layers, dtype,
quantized, batchable, kind (generate or embed), context_length/max_context/max_model_len, temperature, top_p, max_tokens, policy (a name,
or a mapping with ``name`` and the options), policy_options, default_params/defaults/sampling (a mapping of
temperature, top_p and max_tokens), and pipeline (a mapping of ``depth``: micro-batches in flight, and
``cooldown``: seconds between re-partitions, for the model's pipeline of stage nodes), and deployment (a mapping,
or a list of them, one per role: the workers node agents should run, as ``gateway.controller`` reads them: replicas,
min_replicas, max_replicas, role, memory_mb, threads, device, nodes, labels). Anything else, a key given twice under two aliases, or a value of the wrong
type is a ``ValueError`` naming the model and the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fleetserve.gateway.policies import DEFAULT_POLICY
from fleetserve.protocol import fleet_pb2 as pb

log = logging.getLogger(__name__)

GENERATE_KIND, EMBED_KIND = "generate", "embed"
MODEL_KINDS = (GENERATE_KIND, EMBED_KIND)
ROUTES_OF_KIND = {GENERATE_KIND: "/v1/chat/completions and /v1/completions", EMBED_KIND: "/v1/embeddings"}
"""The routes a model of each kind answers on (for the error that sends a request to the right one)."""

_QUANTIZED_DTYPE = re.compile(r"^(i?q\d|u?int[48]|fp[48]|float8|nf4|mxfp4|gptq|awq|bnb)", re.IGNORECASE)


def is_quantized_dtype(dtype: str) -> bool:
    """True for the names of quantized weight types: q8_0, q4_k_m, iq4_xs, int8, int4, fp8, nf4, ..."""
    return bool(_QUANTIZED_DTYPE.match(dtype.strip()))


@dataclass
class ModelSpec:
    """One model as the gateway knows it."""

    name: str
    version: str = ""
    source: str = ""
    """Where the weights come from (a path, a wheel, a hub name); informational."""
    architecture: str = ""
    num_layers: int = 0
    dtype: str = ""
    quantized: bool = False
    batchable: bool = True
    kind: str = ""
    """What the model does: ``generate`` (text, on the chat and completion routes) or ``embed`` (vectors, on
    /v1/embeddings); empty until configured or learned from a worker."""
    dimensions: int = 0
    """An embedding model's vector size; 0 when unknown or not an embedding model."""
    context_length: int = 0
    """Context window in tokens (an embedding model's: the most tokens one input may have); 0 when unknown."""
    temperature: float | None = None
    """Default temperature for requests that give none."""
    top_p: float | None = None
    """Default top_p for requests that give none."""
    max_tokens: int | None = None
    """Default max_tokens for requests that give none."""
    policy: str = DEFAULT_POLICY
    """Name of the balancing policy for this model's workers."""
    policy_options: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    """This model's pipeline settings over the gateway's: ``depth`` (micro-batches in flight) and ``cooldown``."""
    deployment: list[dict[str, Any]] = field(default_factory=list)
    """The workers node agents should run for it, one mapping per role (checked by ``gateway.controller``)."""
    configured: bool = True
    """True when the model config names the model; False when it was only learned from a worker."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (for /v1/models, the admin API and the registry store)."""
        data = asdict(self)
        data["policy_options"] = dict(self.policy_options)
        data["pipeline"] = dict(self.pipeline)
        data["deployment"] = [dict(d) for d in self.deployment]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_json`; keys it does not know (written by another version) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- config parsing -----------------------------------------------------------------------------------------

# config key -> ModelSpec field
_ALIASES: dict[str, str] = {
    "name": "name",
    "version": "version",
    "source": "source",
    "path": "source",
    "architecture": "architecture",
    "num_layers": "num_layers",
    "layers": "num_layers",
    "dtype": "dtype",
    "quantized": "quantized",
    "batchable": "batchable",
    "kind": "kind",
    "context_length": "context_length",
    "max_context": "context_length",
    "max_model_len": "context_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_tokens",
    "policy": "policy",
    "policy_options": "policy_options",
    "pipeline": "pipeline",
    "deployment": "deployment",
}
_PIPELINE_KEYS = {"depth": int, "cooldown": float}
_SAMPLING_SECTIONS = ("default_params", "defaults", "sampling")
_SAMPLING_KEYS = ("temperature", "top_p", "max_tokens")
_ALL_KEYS = sorted([*_ALIASES, *_SAMPLING_SECTIONS])


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check(model: str, key: str, value: object, spec_field: str) -> object:
    """``value`` converted to ``spec_field``'s type, or a ValueError naming the model and the key."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"model {model!r}: {key!r} must be {expected}, got {_type_name(value)} {value!r}")

    if spec_field in ("name", "source", "architecture", "dtype"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if spec_field == "version":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad("a string (quote version numbers such as 1.10)")
        return str(value)
    if spec_field == "kind":
        if value not in MODEL_KINDS:
            raise bad(f"one of {', '.join(MODEL_KINDS)}")
        return value
    if spec_field in ("quantized", "batchable"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if spec_field in ("num_layers", "context_length"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a non-negative integer")
        return value
    if spec_field == "max_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("a positive integer")
        return value
    if spec_field == "temperature":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise bad("a number >= 0")
        return float(value)
    if spec_field == "top_p":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad("a number in (0, 1]")
        return float(value)
    if spec_field == "policy":
        if not isinstance(value, str) or not value.strip():
            raise bad("a policy name")
        return value.strip()
    if spec_field == "policy_options":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of option names to values")
        return dict(value)
    if spec_field == "pipeline":
        return _check_pipeline(value, bad)
    if spec_field == "deployment":
        shapes = value if isinstance(value, list) else [value]
        if not shapes or not all(isinstance(d, dict) for d in shapes):
            raise bad("a mapping (or a list of mappings, one per role)")
        return [dict(d) for d in shapes]
    raise AssertionError(spec_field)


def _check_pipeline(value: object, bad) -> dict[str, Any]:
    if not isinstance(value, dict) or not set(value) <= set(_PIPELINE_KEYS):
        raise bad(f"a mapping of {' and '.join(_PIPELINE_KEYS)}")
    out: dict[str, Any] = {}
    for key, kind in _PIPELINE_KEYS.items():
        if key in value:
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (kind is int and v != int(v)):
                raise bad(f"{key} as a non-negative {'integer' if kind is int else 'number'}")
            out[key] = kind(v)
    return out


def parse_model(name: str, settings: dict | None) -> ModelSpec:
    """One model's settings (any accepted key spelling) as a configured ModelSpec."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ValueError(f"model {name!r}: settings must be a mapping, got {_type_name(settings)}")
    values: dict[str, object] = {}
    given_as: dict[str, str] = {}

    def put(key: str, value: object, spec_field: str) -> None:
        if spec_field in given_as:
            raise ValueError(f"model {name!r}: {key!r} repeats {given_as[spec_field]!r}; give it once")
        values[spec_field] = _check(name, key, value, spec_field)
        given_as[spec_field] = key

    for key, value in settings.items():
        if key in _SAMPLING_SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"model {name!r}: {key!r} must be a mapping of {', '.join(_SAMPLING_KEYS)}")
            for sub, sub_value in value.items():
                if sub not in _SAMPLING_KEYS:
                    raise ValueError(
                        f"model {name!r}: unknown key {key}.{sub}; valid: {', '.join(f'{key}.{k}' for k in _SAMPLING_KEYS)}"
                    )
                put(f"{key}.{sub}", sub_value, sub)
        elif key == "policy" and isinstance(value, dict):
            policy_name = value.get("name")
            put("policy.name", policy_name, "policy")
            put("policy", {k: v for k, v in value.items() if k != "name"}, "policy_options")
        elif key in _ALIASES:
            put(key, value, _ALIASES[key])
        else:
            raise ValueError(f"model {name!r}: unknown key {key!r}; valid: {', '.join(_ALL_KEYS)}")
    if "name" in values and values["name"] != name:
        raise ValueError(f"model {name!r}: 'name' says {values['name']!r}; the two must agree")
    values["name"] = name
    if "quantized" not in values and values.get("dtype"):
        values["quantized"] = is_quantized_dtype(str(values["dtype"]))
    return ModelSpec(**values, configured=True)


def _is_wrapper(data: dict) -> bool:
    """True for {"models": [...]} or {"models": {name: {...}}}, as opposed to one model named "models"."""
    if set(data) != {"models"}:
        return False
    inner = data["models"]
    if inner is None or isinstance(inner, list):
        return True
    return (
        isinstance(inner, dict)
        and all(v is None or isinstance(v, dict) for v in inner.values())
        and not set(inner) & set(_ALL_KEYS)
    )


# -- the registry -------------------------------------------------------------------------------------------


class ModelRegistry:
    """model name -> ModelSpec; configured ones from the model config, the rest learned from workers."""

    def __init__(self, specs: Iterable[ModelSpec] = ()):
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self.add(spec)

    @classmethod
    def from_config(cls, data: object) -> ModelRegistry:
        """A registry from parsed config data (see the module docstring for the accepted shapes)."""
        if isinstance(data, dict) and _is_wrapper(data):
            data = data["models"]
        if data is None:
            return cls()
        registry = cls()
        if isinstance(data, list):
            for i, entry in enumerate(data):
                if not isinstance(entry, dict):
                    raise ValueError(
                        f"models[{i}]: each model must be a mapping with a 'name', got {_type_name(entry)}"
                    )
                name = entry.get("name")
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"models[{i}]: 'name' must be a non-empty string, got {name!r}")
                registry.add(parse_model(name, entry))
        elif isinstance(data, dict):
            for name, settings in data.items():
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"model names must be non-empty strings, got {name!r}")
                registry.add(parse_model(name, settings))
        else:
            raise ValueError(f"the model config must be a list of models or a mapping of names, got {_type_name(data)}")
        return registry

    @classmethod
    def load(cls, path: str | Path) -> ModelRegistry:
        """A registry from a JSON (.json) or YAML (.yaml, .yml, anything else) file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"model config {path} is not valid JSON: {exc}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"model config {path} is not valid YAML: {exc}") from None
        try:
            return cls.from_config(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    # -- membership --------------------------------------------------------------------------------------

    def add(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model {spec.name!r} is configured twice")
        self._specs[spec.name] = spec

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter([self._specs[n] for n in self.names()])

    def __len__(self) -> int:
        return len(self._specs)

    def learn(self, info: pb.WorkerInfo) -> ModelSpec:
        """Take in what a registering worker says of its model: a configured model gets the fields its config left
        empty; an unknown model becomes a learned (unconfigured) one. Returns the model's spec."""
        spec = self._specs.get(info.model)
        kind = info.kind or GENERATE_KIND
        if spec is not None and spec.kind and spec.kind != kind:
            raise ValueError(
                f"worker {info.name} serves {info.model!r} as a model of kind {kind!r}, which is known as "
                f"kind {spec.kind!r}"
            )
        if spec is None:
            spec = self._specs[info.model] = ModelSpec(info.model, configured=False)
        spec.kind = kind
        if info.embedding_dimensions:
            spec.dimensions = info.embedding_dimensions
        for spec_field, value in (
            ("version", info.model_version),
            ("architecture", info.architecture),
            ("num_layers", info.num_layers),
            ("dtype", info.dtype),
            ("context_length", info.max_model_len),
        ):
            if not value:
                continue
            current = getattr(spec, spec_field)
            if not current:
                setattr(spec, spec_field, value)
                if spec_field == "dtype" and is_quantized_dtype(value):
                    spec.quantized = True
            elif current != value and spec_field in ("version", "architecture", "num_layers"):
                log.warning(
                    "worker %s reports %s=%r for model %s, which is known as %r",
                    info.name,
                    spec_field,
                    value,
                    info.model,
                    current,
                )
        return spec

    def restore(self, saved: dict[str, Any]) -> ModelSpec:
        """Bring back a model saved by an earlier run (a :meth:`ModelSpec.to_json` dict). A model the current
        config names keeps its settings and only fills gaps from it; any other comes back as learned, since the
        config no longer names it."""
        restored = ModelSpec.from_json(saved)
        spec = self._specs.get(restored.name)
        if spec is None:
            restored.configured = False
            restored.policy_options = dict(restored.policy_options or {})
            self._specs[restored.name] = restored
            return restored
        for name in ("version", "architecture", "num_layers", "dtype", "context_length", "deployment"):
            if not getattr(spec, name) and getattr(restored, name):
                setattr(spec, name, getattr(restored, name))
        return spec

    # -- per-request use ---------------------------------------------------------------------------------

    def apply_defaults(
        self, name: str, temperature: float | None, top_p: float | None, max_tokens: int | None
    ) -> tuple[float | None, float | None, int | None]:
        """The request's (temperature, top_p, max_tokens), with the model's defaults where the request gave None."""
        spec = self._specs.get(name)
        if spec is None:
            return temperature, top_p, max_tokens
        return (
            spec.temperature if temperature is None else temperature,
            spec.top_p if top_p is None else top_p,
            spec.max_tokens if max_tokens is None else max_tokens,
        )

    def policy_for(self, name: str) -> tuple[str, dict[str, Any]]:
        """(policy name, options) for the model's balancing policy; prefix-aware with no options when none is set."""
        spec = self._specs.get(name)
        if spec is None:
            return DEFAULT_POLICY, {}
        return spec.policy or DEFAULT_POLICY, dict(spec.policy_options)

    def to_json(self) -> list[dict[str, Any]]:
        return [spec.to_json() for spec in self]
