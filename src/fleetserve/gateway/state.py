"""GatewayState: everything the gateway's HTTP routes share (workers, pipelines, tokenizers, dispatch, settings, caches,
jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fleetserve.gateway.cache import AnswerCache
from fleetserve.gateway.control import ControlService
from fleetserve.gateway.controller import DeploymentController
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.job_store import MemoryJobStore, RedisJobStore
from fleetserve.gateway.launcher import Launcher
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.pipelines import PipelineController
from fleetserve.gateway.preprocess import Preprocessor
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.settings.gateway import GatewaySettings
from fleetserve.telemetry.tracing import TraceStore


@dataclass
class GatewayState:
    """Everything the routes share; the app keeps it in ``app.state.fleet`` and routers get it by dependency."""

    registry: WorkerRegistry
    tokenizers: TokenizerStore
    dispatcher: Dispatcher
    settings: GatewaySettings
    models: ModelRegistry = field(default_factory=ModelRegistry)
    control: ControlService | None = None
    """The Control service (the admin API sends drain commands through it)."""
    launcher: Launcher | None = None
    """Starts local workers for the admin API's join; None where the gateway does not launch workers."""
    pipelines: PipelineController | None = None
    """The pipelines of stage nodes (which node holds which layers of which model); None in gateways built
    without one (tests)."""
    deployments: DeploymentController | None = None
    """The deployments and the node agents that run them; None in gateways built without one (tests)."""
    answers: AnswerCache | None = None
    """The response cache for deterministic answers; None when it is off."""
    traces: TraceStore = field(default_factory=TraceStore)
    preprocess: Preprocessor | None = None
    """Templating and tokenization off the event loop (helper processes, or a thread for large prompts); None
    makes one from ``tokenizers`` with no helper processes."""
    jobs: MemoryJobStore | RedisJobStore = field(default_factory=MemoryJobStore)
    """Polling-mode requests by key (the request id in its caller's namespace): status, and the result or error
    once finished; in Redis when gateways share them."""
    owner_tags: set[str] = field(default_factory=set)
    """The namespaces requests were kept under (one per API key that sent any), for the admin key's look-ups."""
    probes: dict[str, tuple[float, asyncio.Task[tuple[bool, str]]]] = field(default_factory=dict)
    """/ready's generation probe per worker id: when it started, and the probe (its result once done)."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """Background tasks (polling-mode requests, stopping workers), kept referenced until they finish."""

    def __post_init__(self) -> None:
        if self.preprocess is None:
            self.preprocess = Preprocessor(self.tokenizers)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, referenced in ``tasks`` until it finishes."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
