"""`fleetserve up`'s settings: every gateway option, every engine option for its workers, and how many."""

from __future__ import annotations

from typing import ClassVar

from fleetserve.settings.base import option
from fleetserve.settings.engine import EngineSettings
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.settings.worker import WorkerSettings

WORKER_FIELDS = frozenset(EngineSettings.model_fields) | {"registration_token", "tls_ca", "tls_cert", "tls_key"}
"""What `up` passes on to each worker it starts; the rest of its settings go to the gateway."""


class UpSettings(GatewaySettings, EngineSettings):
    """Everything `fleetserve up` is told: the gateway's settings, the workers' engine settings, and these."""

    command: ClassVar[str] = "up"

    workers: int = option(2, "local whole-model workers (with --pipeline, --prefill or --decode: none unless given)")
    prefill: int = option(0, "local prefill workers: they compute prompts and hand their KV to a decode worker", ge=0)
    decode: int = option(0, "local decode workers: they go on decoding from a prefill worker's KV", ge=0)
    pipeline: int = option(0, "stage nodes of one local pipeline that splits the model's layers (0: none)")
    stage_memory_mb: int | None = option(None, "each stage node's cap on weights plus KV in MiB (default: no cap)")
    threads: int | None = option(None, "torch threads per worker (default: cores / local workers of every kind)")
    tls: bool = option(False, "mutual TLS between the gateway and its workers, with a CA made for this fleet")
    tls_dir: str = option(
        "",
        "keep the fleet's CA and certificates here, made when it has none (implies --tls; default: a temporary folder)",
    )

    def gateway_env(self, explicit: set[str]) -> dict[str, str]:
        """FLEETSERVE_* variables that hand the gateway child the ``explicit`` settings it has."""
        return self.explicit_env(sorted(explicit & set(GatewaySettings.model_fields)))

    def worker_env(self, explicit: set[str]) -> dict[str, str]:
        """FLEETSERVE_* variables that hand each worker child the ``explicit`` settings it has."""
        return self.explicit_env(sorted(explicit & WORKER_FIELDS & set(WorkerSettings.model_fields)))
