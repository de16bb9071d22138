"""Prometheus metrics of the gateway and of a worker.

Each set of metrics lives on its own ``CollectorRegistry`` (never the process-global one), so that several gateways
or workers in one process, and tests, do not clash. Every name starts with ``fleetserve_`` and carries its unit
(``_seconds``, ``_total``, ``ratio``); labels are low-cardinality only (model, worker name, outcome, state), never
request ids or prompts.

Gateway (:class:`GatewayMetrics`): request counters, latency histograms and token counters that the request path
updates, plus per-worker gauges that a custom collector reads from the worker registry's heartbeat data at scrape
time (see :meth:`GatewayMetrics.set_worker_source`). Worker (:class:`WorkerMetrics`): the engine's load and cache
figures, read from ``engine_stats()`` at scrape time, plus request counters the worker service updates; it can serve
``/metrics`` on its own port (:meth:`WorkerMetrics.serve`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetserve.telemetry.fleet_gauges import NodeCollector, WorkerCollector, ratio

log = logging.getLogger(__name__)

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
)
"""Seconds: time to first token, end-to-end latency and queue time, from a few milliseconds to a minute."""

INTER_TOKEN_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds between consecutive tokens of one stream: finer where decode steps usually fall."""

STAGE_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds: one pipeline stage's compute for a step, or one hop's transfer between stages."""

REQUEST_OUTCOMES: tuple[str, ...] = ("ok", "error", "rejected", "cancelled", "cached")
"""The values of the ``outcome`` label of ``fleetserve_requests_total``."""


# -- the gateway ------------------------------------------------------------------------------------------


class GatewayMetrics:
    """The gateway's metrics, on a registry of their own.

    Update the attributes directly, e.g. ``metrics.requests_total.labels(model=m, outcome="ok").inc()`` or
    ``metrics.time_to_first_token_seconds.labels(model=m).observe(s)``; serve :meth:`render` at ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        model = ["model"]
        self.requests_total = Counter(
            "fleetserve_requests_total",
            "Requests finished, by outcome: ok, error, rejected, cancelled or cached.",
            ["model", "outcome"],
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "fleetserve_time_to_first_token_seconds",
            "From the request's arrival to its first output token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "fleetserve_inter_token_latency_seconds",
            "Between consecutive output tokens of one request (a chunk's gap divided by its tokens).",
            model,
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency_seconds = Histogram(
            "fleetserve_e2e_request_latency_seconds",
            "From the request's arrival to its last output token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time_seconds = Histogram(
            "fleetserve_queue_time_seconds",
            "Time a request waited in the gateway before it was sent to a worker.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "fleetserve_prompt_tokens_total", "Prompt tokens of the requests served.", model, registry=r
        )
        self.generation_tokens_total = Counter(
            "fleetserve_generation_tokens_total", "Output tokens generated.", model, registry=r
        )
        self.requests_running = Gauge(
            "fleetserve_requests_running", "Requests sent to a worker and not finished.", model, registry=r
        )
        self.requests_waiting = Gauge(
            "fleetserve_requests_waiting", "Requests waiting in the gateway for a worker.", model, registry=r
        )
        self.response_cache_hits_total = Counter(
            "fleetserve_response_cache_hits_total", "Requests answered from the response cache.", model, registry=r
        )
        self.response_cache_misses_total = Counter(
            "fleetserve_response_cache_misses_total",
            "Cacheable requests not found in the response cache.",
            model,
            registry=r,
        )
        self.retries_total = Counter(
            "fleetserve_retries_total", "Requests sent again after a worker failed before answering.", model, registry=r
        )
        self.failovers_total = Counter(
            "fleetserve_failovers_total", "Streams moved to another worker after theirs failed.", model, registry=r
        )
        self.prefix_cache_predicted_tokens_total = Counter(
            "fleetserve_prefix_cache_predicted_tokens_total",
            "Prompt tokens the router expected the chosen worker to have cached.",
            model,
            registry=r,
        )
        self.prefix_cache_hit_tokens_total = Counter(
            "fleetserve_prefix_cache_hit_tokens_total",
            "Prompt tokens the workers reported as found in their prefix cache.",
            model,
            registry=r,
        )
        self._add_pipeline_metrics(r)
        self._add_kv_metrics(r)
        self._add_controller_metrics(r)
        self._add_collectors(r)

    def _add_controller_metrics(self, r: CollectorRegistry) -> None:
        self.autoscale_decisions_total = Counter(
            "fleetserve_autoscale_decisions_total",
            "Replica changes the autoscaler made, by model and direction (up or down).",
            ["model", "direction"],
            registry=r,
        )

    def _add_collectors(self, r: CollectorRegistry) -> None:
        """The gauges built at scrape time: per worker, and per node agent and deployment."""
        self.workers = WorkerCollector()
        r.register(self.workers)
        self.nodes = NodeCollector()
        r.register(self.nodes)

    def _add_kv_metrics(self, r: CollectorRegistry) -> None:
        """KV that moves (prefill to decode worker) and stays (conversation sessions)."""
        model = ["model"]
        self.kv_transfers_total = Counter(
            "fleetserve_kv_transfers_total",
            "Prompts handed from a prefill worker to a decode worker, by outcome (imported, or fallback: the decode "
            "worker prefilled the prompt itself).",
            [*model, "outcome"],
            registry=r,
        )
        self.kv_transfer_bytes_total = Counter(
            "fleetserve_kv_transfer_bytes_total",
            "Bytes of KV decode workers fetched from prefill workers.",
            model,
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "fleetserve_kv_transfer_seconds",
            "A decode worker's time to fetch and check a prompt's KV from its prefill worker.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.session_turns_total = Counter(
            "fleetserve_session_turns_total",
            "Turns of named conversation sessions, by whether they found the session's worker (held) or not (moved, "
            "new).",
            [*model, "placement"],
            registry=r,
        )

    def _add_pipeline_metrics(self, r: CollectorRegistry) -> None:
        """Pipelines of stage nodes: re-partitions and bubble per model, each stage's compute and link per step."""
        model = ["model"]
        self.pipeline_repartitions_total = Counter(
            "fleetserve_pipeline_repartitions_total",
            "Layer plans applied to a model's pipeline stages, the first one included.",
            model,
            registry=r,
        )
        self.pipeline_bubble = Gauge(
            "fleetserve_pipeline_bubble",
            "Share of the pipeline stages' time idle while the pipeline had work, as its head last reported.",
            model,
            registry=r,
        )
        self.pipeline_stage_compute_seconds = Histogram(
            "fleetserve_pipeline_stage_compute_seconds",
            "One stage's compute for a pipeline step (the head's reports, a step per heartbeat).",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.pipeline_link_transfer_seconds = Histogram(
            "fleetserve_pipeline_link_transfer_seconds",
            "A step's hidden states on their way into a stage, from the sender's send to the stage's decoded tensor.",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )

    def set_worker_source(self, source: Callable[[], Iterable[Any]] | None) -> None:
        """Where the per-worker gauges come from: a callable returning the worker records (called at each scrape)."""
        self.workers.source = source

    def set_node_source(self, source: Callable[[], Any] | None) -> None:
        """Where the node and deployment gauges come from: a callable returning the deployment controller."""
        self.nodes.source = source

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- a worker ---------------------------------------------------------------------------------------------


class EngineCollector(Collector):
    """The engine's load and cache figures, read from ``engine_stats()`` at scrape time.

    ``engine_stats()`` returns an object with ``running``, ``waiting``, ``kv_blocks_used``, ``kv_blocks_total``,
    ``prefix_cache_queries``, ``prefix_cache_hits``, ``num_preemptions``, ``steps``, ``spec_draft_tokens``,
    ``spec_accepted_tokens`` and ``decode_graphs_ready``/``_pending`` (the engine's EngineStats).
    """

    def __init__(self, engine_stats: Callable[[], Any]):
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.engine_stats()
        except Exception:  # a failing engine must not break the scrape of the other metrics
            log.exception("could not read the engine stats for metrics")
            return
        yield GaugeMetricFamily("fleetserve_engine_running", "Requests running in the engine.", value=s.running)
        yield GaugeMetricFamily("fleetserve_engine_waiting", "Requests waiting in the engine.", value=s.waiting)
        yield GaugeMetricFamily(
            "fleetserve_engine_kv_cache_usage_ratio",
            "Fraction of the KV cache blocks in use.",
            value=ratio(s.kv_blocks_used, s.kv_blocks_total),
        )
        yield CounterMetricFamily(
            "fleetserve_engine_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "fleetserve_engine_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            value=s.prefix_cache_hits,
        )
        yield CounterMetricFamily(
            "fleetserve_engine_preemptions", "Requests preempted for lack of KV cache.", value=s.num_preemptions
        )
        yield CounterMetricFamily("fleetserve_engine_steps", "Engine steps run.", value=s.steps)
        yield CounterMetricFamily(
            "fleetserve_engine_spec_draft_tokens",
            "Draft tokens verified by speculative decoding.",
            value=s.spec_draft_tokens,
        )
        yield CounterMetricFamily(
            "fleetserve_engine_spec_accepted_tokens",
            "Draft tokens speculative decoding kept (acceptance rate: accepted / draft).",
            value=s.spec_accepted_tokens,
        )
        graphs = GaugeMetricFamily(
            "fleetserve_engine_decode_graphs",
            "Compiled decode steps (one per padded batch size), built or still being built.",
            labels=["state"],
        )
        graphs.add_metric(["ready"], s.decode_graphs_ready)
        graphs.add_metric(["pending"], s.decode_graphs_pending)
        yield graphs

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood stderr


class WorkerMetrics:
    """A worker's metrics, on a registry of their own: the engine's figures plus what the worker service counts.

    The worker service updates ``requests_total.labels(outcome=...)``, ``generation_tokens_total`` and
    ``time_to_first_token_seconds``; :meth:`serve` exposes ``/metrics`` over HTTP on a background thread.
    """

    def __init__(self, engine_stats: Callable[[], Any] | None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.engine = EngineCollector(engine_stats) if engine_stats is not None else None
        """The engine's figures; None for a worker without a generation engine (an embedding worker)."""
        if self.engine is not None:
            r.register(self.engine)
        self.requests_total = Counter(
            "fleetserve_engine_requests_total",
            "Requests the worker finished, by outcome (ok, error, cancelled, ...).",
            ["outcome"],
            registry=r,
        )
        self.generation_tokens_total = Counter(
            "fleetserve_engine_generation_tokens_total", "Output tokens the worker generated.", registry=r
        )
        self.time_to_first_token_seconds = Histogram(
            "fleetserve_engine_time_to_first_token_seconds",
            "From the request's arrival at the worker to its first output token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_received_bytes_total = Counter(
            "fleetserve_engine_kv_received_bytes_total",
            "Bytes of KV this worker fetched from prefill workers.",
            registry=r,
        )
        self._servers: list[tuple[WSGIServer, threading.Thread]] = []

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str = "0.0.0.0", port: int = 0) -> tuple[WSGIServer, int]:
        """Serve the metrics over HTTP (``GET /metrics``) on a daemon thread; return the server and its bound port.

        ``port`` 0 picks a free port. Stop it with :meth:`close` (or ``server.shutdown(); server.server_close()``).
        """
        server_class = _ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer
        server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}", daemon=True)
        thread.start()
        self._servers.append((server, thread))
        return server, int(server.server_port)

    def close(self) -> None:
        """Stop every server :meth:`serve` started."""
        servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS: tuple[float, ...] = (16, 64, 256, 1024, 4096, 16384, 65536)
SHARE_BUCKETS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class BatchMetrics:
    """An embedding worker's batcher, batch by batch: sizes, how long inputs waited for company, tokens per batch
    and the share of them that was padding. :meth:`observe` takes each batch as it finishes."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.batch_size = Histogram(
            "fleetserve_embed_batch_size", "Inputs per batch the model ran.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_delay_seconds = Histogram(
            "fleetserve_embed_queue_delay_seconds",
            "How long each input waited in the batcher before its batch ran.",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "fleetserve_embed_batch_tokens",
            "Tokens per batch, padding included (inputs x the longest input).",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "fleetserve_embed_batch_padding_ratio",
            "Share of a batch's tokens that were padding.",
            buckets=SHARE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "fleetserve_embed_batch_seconds", "The model's time for one batch.", buckets=STAGE_BUCKETS, registry=r
        )
        self.tokens_total = Counter("fleetserve_embed_tokens_total", "Input tokens embedded.", registry=r)
        self.padded_tokens_total = Counter(
            "fleetserve_embed_padded_tokens_total", "Tokens the model ran, padding included.", registry=r
        )

    def observe(self, batch: Any, seconds: float) -> None:
        """One finished batch (``inputs``, ``waited_s``, ``tokens``, ``padded_tokens``) and its run time."""
        self.batch_size.observe(len(batch.inputs))
        for waited in batch.waited_s:
            self.queue_delay_seconds.observe(waited)
        self.batch_tokens.observe(batch.padded_tokens)
        if batch.padded_tokens:
            self.padding_ratio.observe(1.0 - batch.tokens / batch.padded_tokens)
        self.batch_seconds.observe(seconds)
        self.tokens_total.inc(batch.tokens)
        self.padded_tokens_total.inc(batch.padded_tokens)


class _NoOp:
    """Stands in for any metric: every call is accepted and does nothing."""

    def labels(self, *args: Any, **kwargs: Any) -> _NoOp:
        return self

    def inc(self, *args: Any) -> None:
        pass

    def observe(self, *args: Any) -> None:
        pass

    def set(self, *args: Any) -> None:
        pass


class DisabledGatewayMetrics(GatewayMetrics):
    """GatewayMetrics that record nothing (``--no-telemetry``): /metrics answers with an empty page."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def __getattr__(self, name: str) -> _NoOp:
        return _NoOp()

    def set_worker_source(self, fn: Callable[[], Iterable[Any]]) -> None:
        pass

    def set_node_source(self, fn: Callable[[], Any]) -> None:
        pass
