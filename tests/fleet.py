"""Starting real gateway and worker processes on free loopback ports, for the integration tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

READY_WORKER = re.compile(r"fleetserve worker ready: (\S+) at (\S+),")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A child process whose output is collected line by line."""

    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def wait_for(self, pattern: re.Pattern, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = pattern.search(line)
                if m:
                    return m
            if self.popen.poll() is not None:
                raise RuntimeError(f"process exited ({self.popen.returncode}):\n" + "".join(self.lines[-30:]))
            time.sleep(0.05)
        raise TimeoutError("".join(self.lines[-30:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def spawn(*args: str) -> Proc:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = subprocess.Popen(
        [sys.executable, "-m", "fleetserve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    proc = Proc(popen)

    def pump():
        for line in popen.stdout:
            proc.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc


@dataclass
class Fleet:
    """A gateway and its workers."""

    url: str
    control: str
    gateway: Proc
    workers: list[Proc]
    api_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def add_worker(self, name: str, *extra: str) -> tuple[Proc, str]:
        """Start a worker; returns it and its gRPC address once it is serving."""
        proc = spawn(
            "worker", "--gateway", self.control, "--name", name, "--threads", "1", "--kv-cache-mb", "64", *extra
        )
        self.workers.append(proc)
        return proc, proc.wait_for(READY_WORKER).group(2)

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
        for w in self.workers:
            w.stop()
        self.gateway.stop()


def start_fleet(workers: int = 2, api_key: str = "", heartbeat_timeout: float = 3.0, *gateway_args: str) -> Fleet:
    port, control_port = free_port(), free_port()
    args = ["gateway", "--port", str(port), "--control-port", str(control_port)]
    args += ["--heartbeat-timeout", str(heartbeat_timeout)]
    if api_key:
        args += ["--api-key", api_key]
    gateway = spawn(*args, *gateway_args)
    gateway.wait_for(re.compile("fleetserve gateway ready"))
    fleet = Fleet(f"http://127.0.0.1:{port}", f"127.0.0.1:{control_port}", gateway, [], api_key)
    try:
        for i in range(workers):
            fleet.add_worker(f"worker-{i}")
        if workers:
            fleet.wait_workers(workers)
    except BaseException:
        fleet.stop()
        raise
    return fleet
