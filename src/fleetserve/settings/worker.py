"""A worker's settings: its engine, where it listens, and the gateway it registers with."""

from __future__ import annotations

import socket
from typing import ClassVar, Literal

from pydantic import model_validator

from fleetserve.config import EngineConfig, RetentionConfig
from fleetserve.errors import InvalidRequestError
from fleetserve.settings.base import option
from fleetserve.settings.engine import EngineSettings

STREAM_INTERVAL_HELP = (
    "new tokens a streamed generation gathers before the worker sends them on (its first and last go at once): 1 "
    "sends every token as it comes; N sends every N-th step's, for 1/N of the per-token work between the engine "
    "and the client, in bursts of N tokens (default: 4 on CPU, where that work takes the model's cores; 1 on CUDA)"
)
STREAM_MAX_WAIT_HELP = (
    "with --stream-interval above 1: the longest a token is held back, in ms; gathered tokens go on at the step "
    "after which another step like it would keep them longer (slow steps, a large batch, send every token)"
)


class WorkerSettings(EngineSettings):
    """Everything `fleetserve worker` is told."""

    command: ClassVar[str] = "worker"

    gateway: str | None = option(
        None,
        "the gateway's control address HOST:PORT, or several comma-separated (HOST:PORT,HOST:PORT): the worker "
        "registers with each and serves them all (none: standalone)",
    )
    heartbeat_relay: str | None = option(
        None,
        "HOST:PORT of a heartbeat relay on this machine (a node agent's) to send heartbeats through, batched with "
        "the machine's other workers' (default: straight to the gateway; needs a single --gateway)",
    )
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "gRPC port (0: a free one)")
    advertise: str | None = option(None, "HOST:PORT the gateway should dial (default: host:port)")
    name: str | None = option(None, "worker name (default: hostname-port)")
    served_model_name: str | None = option(
        None, "the name it registers and serves the model under (default: the model's own name)"
    )
    role: Literal["replica", "prefill", "decode", "stage"] = option(
        "replica",
        "replica (the whole model, whole requests), prefill (prompts: hands the KV to a decode worker), decode "
        "(goes on from a prefill worker's KV) or stage (the layers of a pipeline that the gateway assigns)",
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
    stream_interval: int | None = option(None, STREAM_INTERVAL_HELP, ge=1)
    stream_max_wait_ms: float = option(100.0, STREAM_MAX_WAIT_HELP, ge=0)
    drain_timeout: float = option(60.0, "seconds a draining worker waits for its requests before it stops")
    session_ttl: float = option(600.0, "seconds an idle conversation session's KV stays pinned")
    max_sessions: int = option(256, "sessions whose KV this worker pins at once (the longest idle goes first)")
    session_max_tokens: int = option(4096, "most tokens one session may hold; a longer turn is refused")
    session_cache_share: float = option(0.5, "share of the KV cache that pinned sessions may hold together")
    kv_transfer_ttl: float = option(30.0, "seconds a prefill's KV waits for its decode worker to fetch it")
    kv_fetch_timeout: float = option(
        30.0, "seconds a decode worker waits for a prompt's KV before it computes the prompt itself"
    )
    max_batch_size: int = option(
        32, "an embedding model's batcher: most inputs one batch runs (a full batch runs at once)", ge=1
    )
    max_queue_delay_ms: float = option(
        5.0, "an embedding model's batcher: longest an input waits for company before its batch runs", ge=0
    )
    adaptive_queue_delay: bool = option(
        True,
        "an embedding model's batcher: wait out the delay only while requests come closer together than it (a "
        "lightly loaded worker runs a lone input at once)",
    )
    preferred_batch_sizes: list[int] = option(
        None,
        "an embedding model's batcher: a batch of this many inputs runs at once, without waiting out the delay "
        "(repeat for more; none: only full batches do)",
        default_factory=list,
    )
    max_batch_tokens: int = option(
        0, "an embedding model's batcher: most tokens one batch runs, padding included (0: no cap)", ge=0
    )

    @model_validator(mode="after")
    def _gateways_fit(self) -> WorkerSettings:
        if self.role == "stage" and len(self.gateways) > 1:
            raise InvalidRequestError("a stage node takes its layers from one gateway: give one --gateway", "gateway")
        if self.heartbeat_relay and len(self.gateways) != 1:
            raise InvalidRequestError("a heartbeat relay serves one gateway: give exactly one --gateway", "gateway")
        return self

    @property
    def gateways(self) -> list[str]:
        """Every gateway this worker registers with (none: standalone)."""
        return [g.strip() for g in (self.gateway or "").split(",") if g.strip()]

    def identity(self, port: int) -> tuple[str, str]:
        """The address the gateway dials (``advertise``, else host:port) and the worker's name (``name``, else
        hostname-port), once it listens on ``port``."""
        return self.advertise or f"{self.host}:{port}", self.name or f"{socket.gethostname()}-{port}"

    @property
    def served_name(self) -> str:
        """The model's name in the fleet: what clients ask for and the gateway routes by."""
        return self.served_model_name or self.model

    def stream_options(self) -> dict[str, float | None]:
        """How the worker's AsyncEngine gathers a generation's tokens (its constructor's options)."""
        return {"stream_interval": self.stream_interval, "stream_max_wait_s": self.stream_max_wait_ms / 1000}

    def engine_config(self) -> EngineConfig:
        config = super().engine_config()
        config.retention = RetentionConfig(
            session_ttl_s=self.session_ttl,
            max_sessions=self.max_sessions,
            max_session_tokens=self.session_max_tokens,
            session_cache_share=self.session_cache_share,
            transfer_ttl_s=self.kv_transfer_ttl,
        )
        return config.validate()
