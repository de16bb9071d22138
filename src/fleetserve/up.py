"""`fleetserve up`: a gateway plus local workers as child processes, ready when /ready says so.

The local workers are whole-model replicas (``worker-N``), prefill and decode workers (``prefill-N``,
``decode-N``) and the stage nodes of one pipeline (``stage-N``), as many of each as the settings ask. With several
``--model`` values the replicas go to each model in turn (at least one each), so the fleet serves the models side
by side, each with its own workers; ``NAME=SOURCE`` serves a model's files under another name.

The machine's cores are split between the workers (torch threads each), since workers that each use every core
slow one another down. The processes run under a :class:`~fleetserve.supervisor.Supervisor`, each in its own
session, their output echoed to stderr with a ``[name]`` prefix; each gets SIGTERM if `up` itself dies.

`up` is ready when /ready reports every worker; a process that exits before then fails `up` (code 1). From then on
a :class:`~fleetserve.supervisor.Keeper` keeps them running: one that crashes starts again after a growing backoff
(a line on stderr says which exited, with what code, and when it starts again); one that crashes too often in a
short while is crash-looping: it is reported with its last lines and left stopped while the rest go on serving. A
clean exit (a worker stopped through the admin API) is not started again. A restarted gateway has lost its
registry: the workers register again by themselves. Ctrl-C (or SIGTERM) stops every process it started, nothing
started again any more, the workers first (they drain and deregister) and the gateway last: SIGTERM, then SIGKILL
after a grace.

The fleet always has a secret: the one given (``--registration-token``), or a fresh random one, handed to each
child in its environment. With ``--tls`` the gateway and each worker get their own certificate from a CA made for
this fleet (in ``--tls-dir``, or a temporary folder removed at the end).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TextIO

from fleetserve.certs import CertFiles, fleet_certs
from fleetserve.protocol.security import SECRET_ENV
from fleetserve.settings.base import ENV_PREFIX, dial_host
from fleetserve.settings.up import UpSettings
from fleetserve.supervisor import ChildExited, ChildSpec, Keeper, KeeperEvent, RestartPolicy, Supervisor

EMBED_ROLE = "embed"
"""The local counts' name for an embedding worker (it registers as a replica of the embedding model)."""
READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0
"""How long each process has to stop on SIGTERM before it gets SIGKILL."""
GATEWAY_READY = "fleetserve gateway ready"
WORKER_READY = "fleetserve worker ready"
RESTART_POLICY = RestartPolicy(restart_clean_exit=False)
"""A clean exit stays stopped: that is how a worker stopped through the admin API ends."""


def child_specs(
    settings: UpSettings,
    explicit: set[str],
    config_file: str | None = None,
    secret: str = "",
    tls: dict[str, CertFiles] | None = None,
) -> list[ChildSpec]:
    """The gateway's and the workers' specs, gateway first; their output is echoed to stderr, and each gets SIGTERM
    if this process dies.

    Each child gets the settings of ``explicit`` that it has, as FLEETSERVE_* variables (so keys never show in
    process arguments), and the config file; this process's own FLEETSERVE_* settings variables are not
    inherited (a FLEETSERVE_PORT meant for `up` must not become every worker's port). ``secret`` (the fleet
    secret) goes to every child, and each its own files of ``tls`` (by name: gateway, worker-N for the N-th local
    worker of any kind).
    """
    exe = [sys.executable, "-m", "fleetserve"]
    config = ["--config", config_file] if config_file else []
    clean: dict[str, str | None] = {ENV_PREFIX + name.upper(): None for name in UpSettings.model_fields}
    counts = local_counts(settings, explicit)
    threads = threads_per_worker(settings.threads, counts.total)
    fleet = {SECRET_ENV: secret} if secret else {}
    gateway_env = {**clean, **settings.gateway_env(explicit), **fleet, **(tls["gateway"].env() if tls else {})}
    # exit_with_parent holds since each is started from the main thread or the keeper's, both as long-lived as `up`
    gateway_argv = [*exe, "gateway", *config]
    specs = [ChildSpec("gateway", gateway_argv, gateway_env, GATEWAY_READY, sys.stderr, exit_with_parent=True)]
    control = f"{dial_host(settings.control_host)}:{settings.control_port}"
    worker_env = {**clean, **settings.worker_env(explicit), **fleet}
    cap = ["--max-memory-mb", str(settings.stage_memory_mb)] if settings.stage_memory_mb else []
    served = settings.served
    for i, (name, role) in enumerate(counts.workers()):
        env = {**worker_env, **(tls[f"worker-{i}"].env() if tls else {})}
        # an embedding worker is a replica of the embedding model: it is given no role
        argv = [*exe, "worker"] + (["--role", role] if role not in ("replica", EMBED_ROLE) else [])
        argv += ["--gateway", control, "--name", name, "--threads", str(threads)]
        if role == EMBED_ROLE:
            model = source = settings.embedding_model
        else:
            model, source = served[i % len(served)] if role == "replica" else served[0]
        argv += ["--model", source] + (["--served-model-name", model] if model != source else [])
        argv += cap if role == "stage" else []
        specs.append(ChildSpec(name, [*argv, *config], env, WORKER_READY, sys.stderr, exit_with_parent=True))
    return specs


@dataclass(frozen=True)
class LocalCounts:
    """The local workers `up` starts, by kind."""

    replicas: int
    prefill: int
    decode: int
    stages: int
    embedders: int = 0

    @property
    def total(self) -> int:
        return self.replicas + self.prefill + self.decode + self.stages + self.embedders

    @property
    def serving(self) -> int:
        """Healthy workers /ready reports once every one has loaded: a pipeline serves through its head alone."""
        return self.replicas + self.prefill + self.decode + (1 if self.stages else 0) + self.embedders

    def workers(self) -> list[tuple[str, str]]:
        """(name, role) of each, in the order they start: replicas, prefill, decode, the stage nodes, then the
        embedding workers (role ``embed`` here; they register as replicas of the embedding model)."""
        kinds = (("worker", "replica", self.replicas), ("prefill", "prefill", self.prefill))
        kinds += (("decode", "decode", self.decode), ("stage", "stage", self.stages))
        kinds += (("embed", EMBED_ROLE, self.embedders),)
        return [(f"{prefix}-{i}", role) for prefix, role, n in kinds for i in range(n)]

    def summary(self) -> str:
        """E.g. "2 worker(s)", "1 prefill and 1 decode worker(s)", "2 worker(s) and a pipeline of 3 stage node(s)"."""
        parts = [f"{self.replicas} worker(s)"] if self.replicas or self.total == 0 else []
        if self.prefill or self.decode:
            parts.append(f"{self.prefill} prefill and {self.decode} decode worker(s)")
        if self.stages:
            parts.append(f"a pipeline of {self.stages} stage node(s)")
        if self.embedders:
            parts.append(f"{self.embedders} embedding worker(s)")
        if len(parts) > 1 and not any(" and " in p for p in parts):
            return f"{', '.join(parts[:-1])} and {parts[-1]}"
        return ", ".join(parts)


def threads_per_worker(threads: int | None, workers: int) -> int:
    """Torch threads of each local worker: ``threads`` when given, else the machine's cores split between the
    ``workers`` (at least one each)."""
    return threads or max(1, (os.cpu_count() or 1) // max(1, workers))


CORES_PER_WORKER = 4
"""Cores per local replica by default: one worker using every core of a small machine serves more under load than
several sharing them (docs/operations.md has the measurement), and a small model gains little past 4 threads."""


def default_workers() -> int:
    """Local replicas when --workers is not given: one per CORES_PER_WORKER cores, at least one."""
    return max(1, (os.cpu_count() or 1) // CORES_PER_WORKER)


def local_counts(settings: UpSettings, explicit: set[str]) -> LocalCounts:
    """The local workers to start: with a pipeline or prefill/decode workers, replicas only when --workers was
    given; with several models, at least one replica each (the pipeline and the prefill and decode workers serve
    the first)."""
    stages, prefill, decode = max(0, settings.pipeline), settings.prefill, settings.decode
    workers = settings.workers if settings.workers is not None else default_workers()
    replicas = workers if not (stages or prefill or decode) or "workers" in explicit else 0
    if len(settings.model) > 1:  # the replicas go to each model in turn: at least one each
        replicas = max(replicas, len(settings.model))
    return LocalCounts(max(0, replicas), prefill, decode, stages, 1 if settings.embeddings else 0)


def wait_ready(
    url: str,
    supervisor: Supervisor,
    timeout_s: float,
    workers: int,
    headers: dict | None = None,
    stopping: threading.Event | None = None,
) -> dict | None:
    """Poll GET url/ready until it is ready with ``workers`` healthy workers; None if ``stopping`` is set first.

    Raises ChildExited if a child exits, TimeoutError when time runs out."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if stopping is not None and stopping.is_set():
            return None
        for child in supervisor.exited():
            raise ChildExited(child.name, child.returncode, child.tail())
        try:
            req = urllib.request.Request(url + "/ready", headers=headers or {})
            with urllib.request.urlopen(req, timeout=15) as resp:
                body = json.loads(resp.read())
            if sum(m["healthy_workers"] for m in body["models"].values()) >= workers:
                return body
            last = body
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if stopping is not None:
            stopping.wait(0.5)
        else:
            time.sleep(0.5)
    raise TimeoutError(f"the fleet was not ready after {timeout_s:.0f}s: {last}")


def event_message(event: KeeperEvent) -> str:
    """The line (lines, for a crash loop) `up` prints about what its keeper noticed or did."""
    text = f"fleetserve up: {event.name} {event.detail}"
    if event.kind == "crash-looping":
        text += "; the others go on serving. Its last lines:" + "".join(f"\n  {line}" for line in event.lines)
    return text


def fleet_keeper(supervisor: Supervisor, out: TextIO | None = None) -> Keeper:
    """The keeper of `up`'s processes, each of its events printed to ``out`` (stderr by default)."""

    def report(event: KeeperEvent) -> None:
        print(event_message(event), file=out or sys.stderr, flush=True)

    return Keeper(supervisor, RESTART_POLICY, on_event=report)


def _serve(url: str, ready: dict, keeper: Keeper, stopping: threading.Event) -> int:
    """Say where the fleet answers, then keep it running until a signal (0)."""
    workers = sum(m["healthy_workers"] for m in ready["models"].values())
    print(f"fleetserve is ready: {workers} worker(s) serving {', '.join(ready['models'])}", flush=True)
    print(f"  API:     {url}/v1   (OpenAI-compatible)", flush=True)
    print(f"  health:  {url}/health   readiness: {url}/ready", flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    keeper.start_thread()
    while not stopping.is_set():
        stopping.wait(0.5)  # a timed wait, so the signal handler runs promptly
    return 0


def run_up(settings: UpSettings, explicit: set[str], config_file: str | None = None) -> int:
    """Start the fleet, say where it answers, and keep it running until Ctrl-C/SIGTERM; 1 if it never got ready."""
    url = f"http://{dial_host(settings.host)}:{settings.port}"
    counts = local_counts(settings, explicit)
    models = ", ".join([name for name, _ in settings.served] + ([settings.embedding_model] * settings.embeddings))
    print(f"starting a gateway, {counts.summary()} on {models} ...", file=sys.stderr, flush=True)
    supervisor = Supervisor()
    keeper = fleet_keeper(supervisor)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    secret = settings.registration_token or secrets.token_urlsafe(32)
    tls_dir = settings.tls_dir or (tempfile.mkdtemp(prefix="fleetserve-tls-") if settings.tls else "")
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        tls = fleet_certs(tls_dir, counts.total) if tls_dir else None
        for spec in child_specs(settings, explicit, config_file, secret, tls):
            keeper.keep(spec)  # nothing is started again before the fleet is ready: its thread starts in _serve
        headers = {"Authorization": f"Bearer {settings.api_key[0]}"} if settings.api_key else None
        try:
            ready = wait_ready(url, supervisor, READY_TIMEOUT_S, counts.serving, headers, stopping)
        except ChildExited as exc:
            print(
                f"fleetserve up: {exc.name} exited with code {exc.returncode} before the fleet was ready",
                file=sys.stderr,
                flush=True,
            )
            return 1
        except TimeoutError as exc:
            print(f"fleetserve up: {exc}", file=sys.stderr, flush=True)
            return 1
        if ready is None:
            print("fleetserve up: stopped before the fleet was ready", file=sys.stderr, flush=True)
            return 1
        return _serve(url, ready, keeper, stopping)
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        keeper.close(STOP_GRACE_S)  # the last kept (the workers) first, the gateway last
        for s, h in old.items():
            signal.signal(s, h)
        if tls_dir and not settings.tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)
