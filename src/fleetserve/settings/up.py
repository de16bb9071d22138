"""`fleetserve up`'s settings: every gateway option, every engine option for its workers, and how many."""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from fleetserve.config import EngineConfig
from fleetserve.errors import InvalidRequestError
from fleetserve.settings.base import option
from fleetserve.settings.engine import EngineSettings
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.settings.worker import STREAM_INTERVAL_HELP, STREAM_MAX_WAIT_HELP, WorkerSettings

WORKER_FIELDS = (frozenset(EngineSettings.model_fields) - {"model"}) | {
    "registration_token",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "stream_interval",
    "stream_max_wait_ms",
}
"""What `up` passes on to each worker it starts (each gets its model in its arguments); the rest of its settings go
to the gateway."""


class UpSettings(GatewaySettings, EngineSettings):
    """Everything `fleetserve up` is told: the gateway's settings, the workers' engine settings, and these."""

    command: ClassVar[str] = "up"

    model: list[str] = option(
        None,
        "model to serve: a name, Hugging Face folder or .gguf file; NAME=SOURCE serves SOURCE under NAME; repeat to "
        "serve several side by side (the whole-model workers go to each in turn, at least one each)",
        default_factory=lambda: ["smollm2-135m-instruct"],
    )

    workers: int | None = option(
        None,
        "local whole-model workers (default: one per 4 cores, at least one; with --pipeline, --prefill or --decode: "
        "none unless given)",
    )
    prefill: int = option(0, "local prefill workers: they compute prompts and hand their KV to a decode worker", ge=0)
    decode: int = option(0, "local decode workers: they go on decoding from a prefill worker's KV", ge=0)
    pipeline: int = option(0, "stage nodes of one local pipeline that splits the model's layers (0: none)")
    stage_memory_mb: int | None = option(None, "each stage node's cap on weights plus KV in MiB (default: no cap)")
    embeddings: bool = option(
        False, "also serve an embedding model (on /v1/embeddings) from a local embedding worker of its own"
    )
    embedding_model: str = option(
        "all-minilm-l6-v2", "the embedding model --embeddings serves: a name or a sentence-transformers folder"
    )
    stream_interval: int | None = option(None, STREAM_INTERVAL_HELP, ge=1)
    stream_max_wait_ms: float = option(100.0, STREAM_MAX_WAIT_HELP, ge=0)
    threads: int | None = option(None, "torch threads per worker (default: cores / local workers of every kind)")
    tls: bool = option(False, "mutual TLS between the gateway and its workers, with a CA made for this fleet")
    tls_dir: str = option(
        "",
        "keep the fleet's CA and certificates here, made when it has none (implies --tls; default: a temporary folder)",
    )

    @field_validator("model")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        if not models:
            raise InvalidRequestError("up needs a model to serve", "model")
        names = [served_model(m)[0] for m in models]
        if any(not name or not source for name, source in map(served_model, models)):
            raise InvalidRequestError("a model is NAME=SOURCE or a name, folder or .gguf file", "model")
        if len(set(names)) < len(names):
            raise InvalidRequestError(f"a model name is given twice: {', '.join(names)}", "model")
        return models

    @property
    def served(self) -> list[tuple[str, str]]:
        """(name, source) of each model it serves, in the order given."""
        return [served_model(m) for m in self.model]

    def engine_config(self) -> EngineConfig:
        """The engine config with the first model (every model's workers get the same engine settings)."""
        return EngineSettings.engine_config(self.model_copy(update={"model": self.served[0][1]}))

    def gateway_env(self, explicit: set[str]) -> dict[str, str]:
        """FLEETSERVE_* variables that hand the gateway child the ``explicit`` settings it has."""
        return self.explicit_env(sorted(explicit & set(GatewaySettings.model_fields)))

    def worker_env(self, explicit: set[str]) -> dict[str, str]:
        """FLEETSERVE_* variables that hand each worker child the ``explicit`` settings it has."""
        return self.explicit_env(sorted(explicit & WORKER_FIELDS & set(WorkerSettings.model_fields)))


def served_model(model: str) -> tuple[str, str]:
    """(name, source) of an `up --model` value: NAME=SOURCE, or a model that serves under its own name."""
    name, sep, source = model.partition("=")
    return (name.strip(), source.strip()) if sep else (model, model)
