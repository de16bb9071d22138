"""A worker's settings: its engine, where it listens, and the gateway it registers with."""

from __future__ import annotations

from typing import ClassVar, Literal

from fleetserve.settings.base import option
from fleetserve.settings.engine import EngineSettings


class WorkerSettings(EngineSettings):
    """Everything `fleetserve worker` is told."""

    command: ClassVar[str] = "worker"

    gateway: str | None = option(None, "the gateway's control address HOST:PORT (none: standalone)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "gRPC port (0: a free one)")
    advertise: str | None = option(None, "HOST:PORT the gateway should dial (default: host:port)")
    name: str | None = option(None, "worker name (default: hostname-port)")
    role: Literal["replica", "stage"] = option(
        "replica", "replica (the whole model) or stage (the layers of a pipeline that the gateway assigns)"
    )
    max_memory_mb: int | None = option(
        None, "a stage's cap on its weights plus KV in MiB (default: the whole model's weights plus --kv-cache-mb)"
    )
    metrics_port: int | None = option(
        None, "serve Prometheus metrics on this HTTP port at /metrics (0: a free one; default: none)"
    )
    registration_token: str = option(
        "", "the fleet secret: registering and every call to this worker need it (empty: open)", secret=True
    )
    tls_ca: str = option(
        "", "the fleet CA's certificate (PEM file): mutual TLS for this worker's server and its gateway link"
    )
    tls_cert: str = option("", "this worker's certificate (PEM file), signed by the fleet CA")
    tls_key: str = option("", "this worker's private key (PEM file)", secret=True)
    drain_timeout: float = option(60.0, "seconds a draining worker waits for its requests before it stops")
