"""`fleetserve node`: the node agent, one per machine, running the workers the gateway places on it.

The agent holds a NodeSession stream open with the gateway's Control service (with the fleet secret, over mutual
TLS when certificates are configured, as every other link). It reports the machine (cores, memory, GPUs, worker
slots, labels) and its workers every interval and at once when one changes state; the gateway sends the node's
plan, the whole set of workers it should run. The agent starts each planned worker it lacks (an ordinary
``fleetserve worker`` process that registers with the gateway itself), keeps it running through a
:class:`~fleetserve.supervisor.Keeper` (a crashed worker comes back after an exponential backoff; too many
crashes in the window and it is left *crash-looping*, reported with its last lines, until the plan changes), and
stops with SIGTERM the workers the plan no longer names: they drain and exit. Each worker's output goes to
``LOG_DIR/worker-NAME.log``, rotated by size. The agent also runs a heartbeat relay on the node's address
(``worker.heartbeat_relay``; ``--no-relay-heartbeats`` turns it off): its workers heartbeat to it, and it sends
their reports to the gateway together, one message per interval for the whole machine.

When the gateway goes away the workers go on (they register again by themselves) and the agent reconnects with
backoff; on reconnecting it reports what it runs and the gateway adopts it. When the agent stops (SIGTERM,
Ctrl-C) it stops its workers, which drain first; if it is killed outright, each worker gets SIGTERM from the
kernel (parent-death signal) and drains and exits the same way: no worker is left behind unsupervised.

The agent loads no model and no torch: it is a small process that starts others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

import grpc
import psutil

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.cancellation import raise_if_cancelling
from fleetserve.protocol.security import FleetCredentials
from fleetserve.settings.base import ENV_PREFIX
from fleetserve.settings.node import NodeSettings
from fleetserve.supervisor import ChildSpec, Keeper, RestartPolicy
from fleetserve.worker.heartbeat_relay import HeartbeatRelay, serve_relay

log = logging.getLogger(__name__)

WORKER_READY = "fleetserve worker ready"
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
REPORT_INTERVAL_S = 1.0
"""Until the gateway's first plan says otherwise."""
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class NodeRefused(Exception):
    """The gateway refused this node (wrong fleet secret, or a bad offer): retrying will not help."""


def machine_info(settings: NodeSettings) -> pb.NodeInfo:
    """What this machine offers: the settings' figures, or what it has."""
    memory = settings.max_memory_mb * 2**20 if settings.max_memory_mb else int(psutil.virtual_memory().total * 0.9)
    return pb.NodeInfo(
        name=settings.name or socket.gethostname(),
        host=settings.host,
        cpus=settings.cpus or os.cpu_count() or 1,
        memory_bytes=memory,
        gpus=settings.gpus,
        max_workers=settings.max_workers,
        labels=settings.label_map(),
    )


class NodeAgent:
    """Applies the gateway's plans to this machine's workers and reports them (see the module docstring)."""

    def __init__(self, settings: NodeSettings, credentials: FleetCredentials | None = None):
        self.settings = settings
        self.credentials = credentials or FleetCredentials.from_settings(settings)
        self.info = machine_info(settings)
        self.policy = RestartPolicy(
            initial_backoff_s=settings.restart_backoff,
            max_backoff_s=settings.restart_backoff_max,
            crash_loop_crashes=settings.crash_loop_restarts,
            crash_loop_window_s=settings.crash_loop_window,
            restart_clean_exit=True,  # a planned worker runs until the plan drops it
        )
        self.keeper = Keeper(policy=self.policy, on_event=self._on_event)
        self.plan: dict[str, pb.WorkerLaunch] = {}
        self.plan_version = 0
        self.report_interval_s = REPORT_INTERVAL_S
        self._wake = asyncio.Event()
        self._stopping: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.relay = HeartbeatRelay(settings.gateway, self.credentials) if settings.relay_heartbeats else None
        self.relay_address = ""  # HOST:PORT, once the relay listens

    # -- the plan ---------------------------------------------------------------------------------------

    def apply(self, plan: pb.NodePlan) -> None:
        """Start the planned workers this node lacks and stop those it no longer plans."""
        if plan.report_interval_s > 0:
            self.report_interval_s = plan.report_interval_s
            if self.relay is not None:
                self.relay.flush_s = plan.report_interval_s
        wanted = {w.name: w for w in plan.workers}  # the gateway names a changed worker anew: names suffice
        for name in list(self.plan):
            if name not in wanted:
                self._release(name)
        for name, launch in wanted.items():
            if name not in self.plan:
                try:
                    self.keeper.keep(self.spec(launch))
                except (OSError, ValueError) as exc:  # not startable here: the next plan tries again
                    log.error("node: cannot start %s: %s", name, exc)
                    continue
                self.plan[name] = launch
                log.info("node: started %s (%s, %s) with %d thread(s)", name, launch.model, launch.role or "replica",
                         launch.threads)  # fmt: skip
        self.plan_version = plan.version
        self._wake.set()

    def _release(self, name: str) -> None:
        """Stop keeping a worker and stop it in the background (SIGTERM: it drains, then exits)."""
        self.plan.pop(name, None)
        log.info("node: stopping %s (no longer planned)", name)
        task = asyncio.ensure_future(asyncio.to_thread(self.keeper.release, name, self.settings.stop_grace))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def spec(self, launch: pb.WorkerLaunch) -> ChildSpec:
        """The worker process for a planned launch."""
        s = self.settings
        argv = [sys.executable, "-m", "fleetserve", "worker", "--gateway", s.gateway, "--name", launch.name]
        argv += ["--model", launch.model, "--host", s.host, "--threads", str(max(1, launch.threads))]
        if launch.device:
            argv += ["--device", launch.device]
        if launch.role == "stage":  # its cap: the gateway gives it the layers that fit
            argv += ["--max-memory-mb", str(launch.memory_mb)] if launch.memory_mb else []
        elif launch.kv_cache_mb:
            argv += ["--kv-cache-mb", str(launch.kv_cache_mb)]
        if launch.role and launch.role != "replica":
            argv += ["--role", launch.role]
        if self.relay_address:
            argv += ["--heartbeat-relay", self.relay_address]
        # This agent's own settings variables must not become the worker's (FLEETSERVE_NAME is the node's name).
        env: dict[str, str | None] = {ENV_PREFIX + field.upper(): None for field in NodeSettings.model_fields}
        env.update(self.credentials.child_env())
        log_file = Path(s.log_dir) / f"worker-{_SAFE_NAME.sub('_', launch.name)}.log"
        return ChildSpec(
            launch.name,
            argv,
            env,
            ready=WORKER_READY,
            max_lines=200,
            log_file=str(log_file),
            log_max_bytes=int(s.log_max_mb * 2**20),
            exit_with_parent=True,
        )

    # -- reports ----------------------------------------------------------------------------------------

    def report(self) -> pb.NodeReport:
        workers = []
        for status in self.keeper.statuses():
            launch = self.plan.get(status.name)
            if launch is None:
                continue  # being stopped: no longer this node's business
            workers.append(
                pb.NodeWorker(
                    name=status.name,
                    model=launch.model,
                    role=launch.role,
                    state=status.state,
                    pid=status.pid or 0,
                    restarts=status.restarts,
                    last_exit_code=status.last_exit_code or 0,
                    last_lines=status.last_lines,
                    next_start_in_s=status.next_start_in_s,
                    uptime_s=status.uptime_s,
                    crashes=status.crashes,
                    launch=launch,
                )
            )
        return pb.NodeReport(info=self.info, workers=workers, plan_version=self.plan_version)

    def _on_event(self, event) -> None:
        """A worker crashed, came back or is crash-looping (the keeper has logged it): report it now (from the
        keeper's thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _reports(self):
        while True:
            self._wake.clear()
            yield self.report()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.report_interval_s)

    # -- the session ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the session with the gateway for as long as the agent runs, reconnecting with backoff."""
        self._loop = asyncio.get_running_loop()
        relay_server = relay_task = None
        if self.relay is not None:
            relay_server, port = await serve_relay(self.relay, f"{self.settings.host}:0")
            self.relay_address = f"{self.settings.host}:{port}"
            relay_task = asyncio.ensure_future(self.relay.run())
        self.keeper.start_thread()
        channel = self.credentials.channel(self.settings.gateway)
        stub = pb_grpc.ControlStub(channel)
        backoff = 0.2
        try:
            while True:
                try:
                    async for plan in stub.NodeSession(self._reports()):
                        backoff = 0.2
                        self.apply(plan)
                    log.warning("node: the gateway ended the session; connecting again")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in REFUSALS:
                        raise NodeRefused(f"{exc.code().name}: {exc.details()}") from None
                    log.info("node: gateway %s unreachable (%s); retrying in %.1fs", self.settings.gateway,
                             exc.code().name, backoff)  # fmt: skip
                raise_if_cancelling()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            await channel.close()
            if relay_task is not None:
                relay_task.cancel()
                await relay_server.stop(None)

    async def close(self) -> None:
        """Stop every worker (each drains first) and the keeper."""
        await asyncio.to_thread(self.keeper.close, self.settings.stop_grace)
        for task in list(self._stopping):
            await task


async def run_node(settings: NodeSettings) -> int:
    """Run the node agent until SIGINT/SIGTERM; 2 when the gateway refuses it."""
    agent = NodeAgent(settings)
    print(
        f"fleetserve node ready: {agent.info.name} ({agent.info.cpus} core(s), {agent.info.memory_bytes // 2**20} MiB, "
        f"{agent.info.max_workers} worker slot(s)) serving gateway {settings.gateway}",
        flush=True,
    )
    session = asyncio.ensure_future(agent.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({session, waiter}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if session.done() and isinstance(session.exception(), NodeRefused):
        print(f"fleetserve node: the gateway refused this node: {session.exception()}", file=sys.stderr, flush=True)
        code = 2
    session.cancel()
    waiter.cancel()
    print("fleetserve node: stopping its workers (they drain first) ...", file=sys.stderr, flush=True)
    await agent.close()
    return code
