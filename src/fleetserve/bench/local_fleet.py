"""Local fleets for the benchmarks: a gateway and workers as supervised child processes on free loopback ports."""

from __future__ import annotations

import random
import socket
import sys
import time

import httpx

from fleetserve.supervisor import Child, ChildSpec, Supervisor

READY_S = 180.0
"""How long the gateway, then the workers, have to say they are ready."""
COMPILED_S = 1800.0
"""How long workers have to build their compiled decode steps (about a minute per batch size on a small CPU
with an empty inductor cache, seconds with a warm one)."""


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 where it does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, for a process about to be started on it. It is drawn below the kernel's
    range for outgoing connections: a port from that range (what binding port 0 gives) can be taken as the source
    port of some connection before the process binds it."""
    low = _ephemeral_low()
    if low > 2048:
        for _ in range(100):
            port = random.randrange(1024, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(name: str, ready: str, *args: str) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-m", "fleetserve", *args], ready=ready)


class Fleet:
    """A gateway with ``workers`` local workers of ``threads`` torch threads each, and ``stages`` stage nodes (one
    pipeline, ``stage_args`` for each) of as many threads; ``close`` stops them all. ``roles``: each worker's role
    (replica when not given; a worker of role R is named ``R-i``)."""

    def __init__(
        self,
        workers: int,
        threads: int,
        *gateway_args: str,
        kv_cache_mb: int = 512,
        stages: int = 0,
        stage_args: tuple[str, ...] = (),
        roles: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
    ):
        port, control = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.supervisor = Supervisor()
        self.workers: list[Child] = []
        try:
            gateway = ["gateway", "--port", str(port), "--control-port", str(control), *gateway_args]
            self.gateway = self.supervisor.start(_spec("gateway", "fleetserve gateway ready", *gateway))
            self.gateway.wait_ready(READY_S)
            for i in range(workers):
                role = roles[i] if i < len(roles) else "replica"
                name = f"w{i}" if role == "replica" else f"{role}-{i}"
                args = ["worker", "--gateway", f"127.0.0.1:{control}", "--name", name, "--threads", str(threads)]
                args += ["--kv-cache-mb", str(kv_cache_mb), "--role", role, *worker_args]
                self.workers.append(self.supervisor.start(_spec(name, "fleetserve worker ready", *args)))
            for i in range(stages):
                args = ["worker", "--role", "stage", "--gateway", f"127.0.0.1:{control}", "--name", f"s{i}"]
                args += ["--threads", str(threads), "--kv-cache-mb", str(kv_cache_mb), *stage_args]
                self.workers.append(self.supervisor.start(_spec(f"s{i}", "fleetserve worker ready", *args)))
            self.supervisor.wait_ready(READY_S)
            self._wait_healthy(workers + (1 if stages else 0))
            self.compile_wait_s = wait_compiled(self.url)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, workers: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = httpx.get(self.url + "/ready", timeout=30).json()
            if sum(m["healthy_workers"] for m in body.get("models", {}).values()) == workers:
                return
            time.sleep(0.2)
        raise TimeoutError("workers did not become ready")

    def close(self) -> None:
        self.supervisor.stop_all()


def wait_compiled(url: str, timeout_s: float = COMPILED_S, log=print) -> float:
    """Wait until no worker of the gateway at ``url`` is still building compiled decode steps, so that a
    measurement sees the steady state; returns the seconds waited."""
    started = time.monotonic()
    said = None
    while time.monotonic() - started < timeout_s:
        workers = httpx.get(url + "/admin/workers", timeout=30).json()["workers"]
        pending = sum(w.get("decode_graphs_pending", 0) for w in workers)
        if not pending:
            return time.monotonic() - started
        if pending != said:
            log(f"waiting for workers to compile {pending} more decode step(s) ...")
            said = pending
        time.sleep(1.0)
    raise TimeoutError(f"workers were still compiling decode steps after {timeout_s:.0f}s")
