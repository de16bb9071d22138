"""The gateway's gauges built at scrape time: per worker from the registry, per node agent and deployment from the
deployment controller."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WORKER_STATES: tuple[str, ...] = ("healthy", "suspect", "draining", "dead")
"""The states ``fleetserve_worker_state`` always lists (the gateway registry's WorkerState values)."""


def ratio(used: float, total: float) -> float:
    """used / total, 0 when the total is 0."""
    return float(used) / float(total) if total else 0.0


class WorkerCollector(Collector):
    """Per-worker gauges, built at scrape time from the records a callable returns.

    A record needs ``name``, ``info.model``, ``state.value``, ``stats.running``, ``stats.waiting``,
    ``stats.kv_blocks_used``, ``stats.kv_blocks_total``, ``stats.prefix_cache_hits``, ``stats.prefix_cache_queries``,
    ``stats.spec_draft_tokens``, ``stats.spec_accepted_tokens``, ``recent_first_token_s`` and ``recent_inter_token_s`` (the gateway's WorkerRecord has them all).
    """

    def __init__(self, source: Callable[[], Iterable[Any]] | None = None, states: Iterable[str] = WORKER_STATES):
        self.source = source
        self.states = tuple(states)

    def _records(self) -> list[Any]:
        if self.source is None:
            return []
        for attempt in range(3):
            try:
                records = list(self.source())
                break
            except RuntimeError:  # the table changed while it was read (a scrape on another thread): read again
                if attempt == 2:
                    log.exception("could not read the worker records for metrics")
                    return []
            except Exception:  # a broken source must not break the whole scrape
                log.exception("could not read the worker records for metrics")
                return []
        # One series per (worker, model): when a name appears twice (a worker came back elsewhere and its old
        # record is still listed as dead), the live record wins.
        chosen: dict[tuple[str, str], Any] = {}
        for record in records:
            key = (str(record.name), str(record.info.model))
            old = chosen.get(key)
            if old is None or str(old.state.value) == "dead":
                chosen[key] = record
        return list(chosen.values())

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "model"]
        state = GaugeMetricFamily(
            "fleetserve_worker_state",
            "The worker's health state as the gateway sees it: 1 for the current state, 0 for the others.",
            labels=["worker", "model", "state"],
        )
        running = GaugeMetricFamily("fleetserve_worker_running", "Requests running on the worker.", labels=labels)
        waiting = GaugeMetricFamily("fleetserve_worker_waiting", "Requests waiting on the worker.", labels=labels)
        kv = GaugeMetricFamily(
            "fleetserve_worker_kv_cache_usage_ratio", "Fraction of the worker's KV cache blocks in use.", labels=labels
        )
        hits = CounterMetricFamily(
            "fleetserve_worker_prefix_cache_hits",
            "Prompt tokens the worker found in its prefix cache, as last reported.",
            labels=labels,
        )
        queries = CounterMetricFamily(
            "fleetserve_worker_prefix_cache_queries",
            "Prompt tokens the worker looked up in its prefix cache, as last reported.",
            labels=labels,
        )
        drafts = CounterMetricFamily(
            "fleetserve_worker_spec_draft_tokens",
            "Draft tokens the worker verified by speculative decoding, as last reported.",
            labels=labels,
        )
        accepted = CounterMetricFamily(
            "fleetserve_worker_spec_accepted_tokens",
            "Draft tokens the worker's speculative decoding kept, as last reported.",
            labels=labels,
        )
        ttft = GaugeMetricFamily(
            "fleetserve_worker_recent_ttft_seconds",
            "The worker's recent time to first token, as last reported.",
            labels=labels,
        )
        itl = GaugeMetricFamily(
            "fleetserve_worker_recent_itl_seconds",
            "The worker's recent inter-token latency, as last reported.",
            labels=labels,
        )
        for record in self._records():
            values = [str(record.name), str(record.info.model)]
            current = str(record.state.value)
            for name in self.states if current in self.states else (*self.states, current):
                state.add_metric([*values, name], 1.0 if name == current else 0.0)
            stats = record.stats
            running.add_metric(values, float(stats.running))
            waiting.add_metric(values, float(stats.waiting))
            kv.add_metric(values, ratio(stats.kv_blocks_used, stats.kv_blocks_total))
            hits.add_metric(values, float(stats.prefix_cache_hits))
            queries.add_metric(values, float(stats.prefix_cache_queries))
            drafts.add_metric(values, float(stats.spec_draft_tokens))
            accepted.add_metric(values, float(stats.spec_accepted_tokens))
            ttft.add_metric(values, float(record.recent_first_token_s))
            itl.add_metric(values, float(record.recent_inter_token_s))
        yield from (state, running, waiting, kv, hits, queries, drafts, accepted, ttft, itl)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the names are fixed, but the samples depend on the source: no check at registration


class NodeCollector(Collector):
    """Node agents' workers and the deployments' desired and actual counts, built at scrape time.

    The source returns an object with ``nodes.nodes`` (node records: ``name``, ``workers`` by name, each with
    ``model``, ``state`` and ``restarts``) and ``to_json()`` (the deployments with their ``status``): the gateway's
    DeploymentController."""

    def __init__(self, source: Callable[[], Any] | None = None):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        try:
            controller = self.source()
            nodes = list(controller.nodes.nodes.values())
            deployments = controller.to_json()
        except Exception:  # a broken source must not break the whole scrape
            log.exception("could not read the nodes for metrics")
            return
        workers = GaugeMetricFamily(
            "fleetserve_node_workers", "Workers node agents run, by node and state.", labels=["node", "state"]
        )
        restarts = CounterMetricFamily(
            "fleetserve_node_worker_restarts",
            "Times a node agent started a crashed worker again.",
            labels=["node", "worker", "model"],
        )
        looping = GaugeMetricFamily(
            "fleetserve_node_worker_crash_looping",
            "1 for a worker its node stopped restarting: it crashed too often within the crash-loop window.",
            labels=["node", "worker", "model"],
        )
        for node in nodes:
            counts: dict[str, int] = {}
            for worker in node.workers.values():
                counts[worker.state] = counts.get(worker.state, 0) + 1
                restarts.add_metric([node.name, worker.name, worker.model], worker.restarts)
                looping.add_metric([node.name, worker.name, worker.model], worker.state == "crash-looping")
            for state, n in sorted(counts.items()):
                workers.add_metric([node.name, state], n)
        replicas = GaugeMetricFamily(
            "fleetserve_deployment_replicas",
            "A deployment's workers: desired, planned on nodes, running there, and serving (registered, healthy).",
            labels=["model", "role", "kind"],
        )
        for d in deployments:
            for kind in ("desired", "planned", "running", "serving"):
                replicas.add_metric([d["model"], d["role"], kind], d["status"][kind])
        yield from (workers, restarts, looping, replicas)
