"""GatewayState: everything the gateway's HTTP routes share (workers, tokenizers, dispatch, settings, caches, jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fleetserve.gateway.cache import AnswerCache
from fleetserve.gateway.control import ControlService
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.launcher import Launcher
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.preprocess import PreprocessPool
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
    answers: AnswerCache | None = None
    """The response cache for deterministic answers; None when it is off."""
    traces: TraceStore = field(default_factory=TraceStore)
    preprocess: PreprocessPool | None = None
    """Helper processes for templating and tokenization; None tokenizes inline."""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Polling-mode requests by request id: status, and the result or error once finished."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    """Background tasks (polling-mode requests, stopping workers), kept referenced until they finish."""

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, referenced in ``tasks`` until it finishes."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
