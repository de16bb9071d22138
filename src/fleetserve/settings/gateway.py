"""The gateway's settings: where it listens, who may use it, routing, failure handling, caching, telemetry."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import model_validator

from fleetserve.errors import InvalidRequestError
from fleetserve.settings.base import Settings, option


class GatewaySettings(Settings):
    """Everything `fleetserve gateway` is told."""

    command: ClassVar[str] = "gateway"

    host: str = option("127.0.0.1", "HTTP address")
    port: int = option(8000, "HTTP port (0: a free one)")
    control_host: str = option("127.0.0.1", "address workers register at (gRPC)")
    control_port: int = option(50050, "gRPC control port")
    api_key: list[str] = option(
        None,
        "require this bearer key on every route but /health (repeat for more)",
        default_factory=list,
        secret=True,
    )
    api_keys_file: str = option("", "a file of accepted API keys, one a line")
    registration_token: str = option(
        "",
        "the fleet secret: registration and every call to a worker need it (required with a non-loopback "
        "--control-host)",
        secret=True,
    )
    tls_ca: str = option(
        "", "the fleet CA's certificate (PEM file): mutual TLS for the control service and worker links"
    )
    tls_cert: str = option("", "the gateway's certificate (PEM file), signed by the fleet CA")
    tls_key: str = option("", "the gateway's private key (PEM file)", secret=True)
    http_tls_cert: str = option("", "serve the HTTP API over TLS with this certificate chain (PEM file)")
    http_tls_key: str = option("", "the HTTP certificate's private key (PEM file)", secret=True)
    worker_networks: list[str] = option(
        None,
        "networks (CIDR, e.g. 10.0.0.0/8) a worker's advertised address must lie in (repeat for more; none: any)",
        default_factory=list,
    )
    admin_key: str = option(
        "", "bearer key the /admin API needs (without one, /admin is refused when API keys are set)", secret=True
    )
    allowed_hosts: list[str] = option(
        None,
        "accept only requests whose Host header names one of these (repeat for more; *.example.com matches "
        "subdomains); empty: any",
        default_factory=list,
    )
    max_body_mb: float = option(8.0, "largest request body accepted in MiB (larger: 413)")
    heartbeat_interval: float = option(1.0, "seconds between a worker's heartbeats")
    heartbeat_timeout: float = option(5.0, "seconds of silence before a worker is dead")
    preprocess_workers: int = option(0, "processes for chat templating and tokenization (0: on the event loop)")
    default_max_tokens: int = option(
        1024, "max_tokens of a request that gives none, capped by what the context window leaves"
    )
    # routing and failure handling
    policy: str | None = option(
        None,
        "balancing policy for models the model config gives none: round-robin, random, least-connections, "
        "least-latency, weighted, kv-aware, prefix-aware, power-of-two or consistent-hash (default: prefix-aware)",
    )
    models: str | dict[str, Any] | None = option(
        None, "model registry: a JSON or YAML file (model_configs.json works), or a mapping in the config file"
    )
    state_db: str = option("", "SQLite file that keeps known workers and models across restarts")
    failure_threshold: int = option(3, "failed requests in a row before a worker is suspect")
    dead_retention: float = option(300.0, "seconds a dead worker stays listed")
    max_retries: int = option(3, "retries and resumes per request")
    max_queue: int = option(256, "requests per model waiting for room; beyond it 503 at once")
    queue_timeout: float = option(300.0, "seconds a request may wait for room")
    output_reserve_tokens: int = option(256, "KV tokens of output reserved per request at admission, beyond its prompt")
    slow_client_timeout: float = option(
        30.0, "cut off a streaming client that reads nothing for this many seconds (0: never)"
    )
    stream_buffer_kb: int = option(256, "kernel send buffer per client connection in KiB, fixed (0: the kernel's)")
    # pipelines of stage nodes (workers started with --role stage)
    pipeline_cooldown: float = option(
        10.0, "seconds between re-partitions that only make a working pipeline faster", ge=0
    )
    pipeline_depth: int = option(0, "micro-batches in flight per pipeline (0: one per stage)", ge=0)
    # response cache (deterministic requests: temperature 0 or a seed)
    response_cache: str = option(
        "",
        "cache deterministic answers: memory, an SQLite file (.sqlite, .db or sqlite:///PATH; survives "
        "restarts) or redis://HOST:PORT/DB (shared by gateways); empty: off",
    )
    response_cache_entries: int = option(10000, "most response-cache entries kept")
    response_cache_mb: int = option(256, "most response-cache MiB kept")
    response_cache_ttl: float = option(0.0, "seconds a response-cache entry lives (0: until evicted)")
    # polling jobs (POST /v1/requests)
    job_store: str = option(
        "",
        "where polling jobs are kept: memory (this gateway's, the default) or redis://HOST:PORT/DB, shared by "
        "gateways: any of them answers a job, and one takes over the unfinished jobs of a gateway that died",
    )
    job_lease: float = option(
        10.0, "seconds a gateway's hold on a running job lasts without renewal (a shared job store)", gt=0
    )
    # telemetry
    telemetry: bool = option(True, "record metrics and keep request traces (--no-telemetry measures their cost)")
    otlp_endpoint: str = option(
        "",
        "export finished request traces over OTLP/HTTP, e.g. http://collector:4318/v1/traces "
        "(pip install 'fleetserve[otel]')",
    )
    launch_threads: int | None = option(
        None, "torch threads of workers joined through the admin API (default: half the cores)"
    )

    @model_validator(mode="after")
    def _keys_from_file(self) -> GatewaySettings:
        """The API keys of --api-keys-file join those given directly."""
        if self.api_keys_file:
            try:
                with open(self.api_keys_file) as f:
                    keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as exc:
                raise InvalidRequestError(f"cannot read api_keys_file {self.api_keys_file}: {exc.strerror}") from None
            self.api_key = list(dict.fromkeys([*self.api_key, *keys]))
        return self

    @model_validator(mode="after")
    def _job_store_scheme(self) -> GatewaySettings:
        spec = self.job_store.strip()
        if spec not in ("", "memory") and spec.split("://", 1)[0].lower() not in ("redis", "rediss"):
            raise InvalidRequestError("job_store is memory, redis://HOST:PORT/DB or rediss://...")
        return self

    @model_validator(mode="after")
    def _http_tls_pair(self) -> GatewaySettings:
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise InvalidRequestError("http_tls_cert and http_tls_key go together: give both or neither")
        return self
