"""Starting real gateway and worker processes on free loopback ports, for the integration tests.

Every process started here gets this test session's fleet secret in its environment (unless told otherwise),
so the suite runs the authenticated path; tests that dial a worker themselves use :func:`worker_channel` or
:func:`worker_metadata`.
"""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from fleetserve.bench.local_fleet import free_port  # noqa: F401 (the tests take it from here)
from fleetserve.protocol.security import SECRET_ENV, FleetCredentials
from fleetserve.supervisor import Child, ChildSpec

FLEET_SECRET = secrets.token_urlsafe(24)
"""The fleet secret of every process these helpers start (fresh for each test session)."""
READY_WORKER = re.compile(r"fleetserve worker ready: (\S+) at (\S+),")


class Proc:
    """A ``fleetserve`` child process whose output is collected line by line (a view of a supervisor's Child)."""

    def __init__(self, child: Child):
        self.child = child

    @property
    def popen(self) -> subprocess.Popen:
        return self.child.popen

    @property
    def lines(self) -> list[str]:
        """Its latest output lines; once it has exited, up to the last line it wrote."""
        if self.child.returncode is not None:
            self.child.join_output()
        return self.child.output()

    def wait_for(self, pattern: re.Pattern, timeout: float = 120) -> re.Match:
        return self.child.wait_for(pattern, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return self.child.stop(timeout, sig)


PROCESS_DTYPE = "float32"
"""The engines of these fleets run float32 weights and eager steps unless a test says otherwise: the tests that
compare texts across workers (failover, disaggregation, pipelines) need the form in which a decode step and a
prefill of the same positions agree to the last bit; int4's bfloat16 inputs magnify their last-bit differences,
and a compiled decode step rounds differently from the eager prefill (and compiling would take the tests' cores)."""
PROCESS_ENV = {"FLEETSERVE_DTYPE": PROCESS_DTYPE, "FLEETSERVE_COMPILE": "false"}


def spawn(*args: str, env: dict[str, str | None] | None = None, inside: tuple[str, ...] = ()) -> Proc:
    """Start ``fleetserve *args`` in its own process group, with the session's fleet secret, float32 weights and
    eager steps (PROCESS_ENV) in its environment and ``env`` over it (a None value unsets a variable); ``inside``:
    a command that runs it (``ip netns exec NS``)."""
    env = {SECRET_ENV: FLEET_SECRET, **PROCESS_ENV, **(env or {})}
    argv = [*inside, sys.executable, "-m", "fleetserve", *args]
    spec = ChildSpec(args[0] if args else "fleetserve", argv, env)
    return Proc(Child(spec).launch())


def worker_metadata(secret: str = FLEET_SECRET) -> tuple[tuple[str, str], ...]:
    """The metadata a direct call to a worker of these fleets needs (for a synchronous channel)."""
    return FleetCredentials(secret).metadata()


def worker_channel(address: str, secret: str = FLEET_SECRET, **tls: str):
    """A grpc.aio channel to a worker of these fleets, carrying the secret (``tls``: ca, cert, key files)."""
    return FleetCredentials(secret, **tls).channel(address)


@dataclass
class Fleet:
    """A gateway and its workers."""

    url: str
    control: str
    gateway: Proc
    workers: list[Proc]
    api_key: str = ""
    worker_env: dict[str, str | None] | None = None
    """Environment for the workers it starts, over the fleet secret (e.g. FLEETSERVE_TLS_* files)."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def add_worker(self, name: str, *extra: str, env: dict[str, str | None] | None = None) -> tuple[Proc, str]:
        """Start a worker; returns it and its gRPC address once it is serving."""
        proc = self.start_worker(name, *extra, env=env)
        return proc, proc.wait_for(READY_WORKER).group(2)

    def start_worker(self, name: str, *extra: str, env: dict[str, str | None] | None = None) -> Proc:
        """Start a worker without waiting for it (``wait_for(READY_WORKER)`` does)."""
        proc = spawn(
            "worker", "--gateway", self.control, "--name", name, "--threads", "1", "--kv-cache-mb", "64", *extra,
            env={**(self.worker_env or {}), **(env or {})},
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def ready(self) -> dict:
        return httpx.get(self.url + "/ready", headers=self.headers, timeout=30).json()

    def wait_workers(self, count: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        body = {}
        while time.monotonic() < deadline:
            body = self.ready()
            n = sum(m["healthy_workers"] for m in body.get("models", {}).values())
            if n == count and body.get("ready"):
                return body
            time.sleep(0.2)
        raise TimeoutError(f"expected {count} healthy workers, /ready says {body}")

    def stop(self) -> None:
        """The workers, side by side (each drains and deregisters), then the gateway."""
        with ThreadPoolExecutor(max(1, len(self.workers))) as pool:
            list(pool.map(lambda w: w.stop(), self.workers))
        self.gateway.stop()


def start_fleet(
    workers: int = 2,
    api_key: str = "",
    heartbeat_timeout: float = 3.0,
    *gateway_args: str,
    gateway_env: dict[str, str | None] | None = None,
    worker_env: dict[str, str | None] | None = None,
    per_worker_env: list[dict[str, str | None]] | None = None,
) -> Fleet:
    """A gateway and ``workers`` workers, every one with the session's fleet secret; the ``*_env`` mappings add
    to (or unset, with None) their environments, ``per_worker_env[i]`` worker i's alone."""
    port, control_port = free_port(), free_port()
    args = ["gateway", "--port", str(port), "--control-port", str(control_port)]
    args += ["--heartbeat-timeout", str(heartbeat_timeout)]
    if api_key:
        args += ["--api-key", api_key]
    gateway = spawn(*args, *gateway_args, env=gateway_env)
    fleet = Fleet(f"http://127.0.0.1:{port}", f"127.0.0.1:{control_port}", gateway, [], api_key, worker_env)
    try:
        # The workers load the model side by side while the gateway starts; they register once it listens.
        started = [
            fleet.start_worker(f"worker-{i}", env=per_worker_env[i] if per_worker_env else None) for i in range(workers)
        ]
        gateway.wait_for(re.compile("fleetserve gateway ready"))
        for proc in started:
            proc.wait_for(READY_WORKER)
        if workers:
            fleet.wait_workers(workers)
    except BaseException:
        fleet.stop()
        raise
    return fleet
