"""The node agent's settings: the gateway it serves, what this machine offers, and how crashed workers come back."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from fleetserve.errors import InvalidRequestError
from fleetserve.settings.base import Settings, option


class NodeSettings(Settings):
    """Everything `fleetserve node` is told."""

    command: ClassVar[str] = "node"

    gateway: str = option("", "the gateway's control address HOST:PORT (required)")
    name: str | None = option(None, "this node's name, unique in the fleet (default: the host name)")
    host: str = option("127.0.0.1", "the address this node's workers listen on and the gateway dials them at")
    max_workers: int = option(4, "most workers this node runs at once", ge=1)
    cpus: int | None = option(None, "cores its workers may use in all, as torch threads (default: every core)", ge=1)
    gpus: int = option(0, "GPUs its workers may use", ge=0)
    max_memory_mb: int | None = option(
        None, "memory its workers may use in all, in MiB (default: 90% of what the machine has)", ge=64
    )
    labels: list[str] = option(
        None, "KEY=VALUE labels a deployment's placement can ask for (repeat for more)", default_factory=list
    )
    relay_heartbeats: bool = option(
        True,
        "relay this node's workers' heartbeats to the gateway, batched: one message per interval for all of them "
        "(off: each worker heartbeats the gateway itself)",
    )
    log_dir: str = option("logs", "folder of the workers' logs (worker-NAME.log, rotated)")
    log_max_mb: float = option(10.0, "size at which a worker's log is rotated, in MiB", gt=0)
    restart_backoff: float = option(1.0, "seconds before the first restart of a crashed worker (doubling)", gt=0)
    restart_backoff_max: float = option(30.0, "longest wait between restarts, in seconds", gt=0)
    crash_loop_restarts: int = option(5, "crashes within --crash-loop-window that stop the restarts", ge=1)
    crash_loop_window: float = option(120.0, "seconds over which crashes are counted", gt=0)
    stop_grace: float = option(60.0, "seconds a worker being stopped has to drain before it is killed", ge=0)
    registration_token: str = option(
        "", "the fleet secret: the node and its workers present it to the gateway", secret=True
    )
    tls_ca: str = option("", "the fleet CA's certificate (PEM file): mutual TLS to the gateway, for its workers too")
    tls_cert: str = option("", "this node's certificate (PEM file), signed by the fleet CA; its workers use it too")
    tls_key: str = option("", "this node's private key (PEM file)", secret=True)

    @model_validator(mode="after")
    def _checked(self) -> NodeSettings:
        if not self.gateway:
            raise InvalidRequestError("a node agent needs --gateway HOST:PORT (the gateway's control address)")
        for label in self.labels:
            key, sep, _ = label.partition("=")
            if not sep or not key:
                raise InvalidRequestError(f"a label is KEY=VALUE, not {label!r}", "labels")
        return self

    def label_map(self) -> dict[str, str]:
        return dict(label.split("=", 1) for label in self.labels)
