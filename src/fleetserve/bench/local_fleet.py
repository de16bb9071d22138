"""Local fleets for the benchmarks: a gateway and workers as child processes on free loopback ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, *args: str):
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fleetserve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.popen.stdout), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.popen.poll() is not None:
                raise RuntimeError("".join(self.lines[-20:]))
            time.sleep(0.05)
        raise TimeoutError("".join(self.lines[-20:]))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


class Fleet:
    """A gateway with ``workers`` local workers of ``threads`` torch threads each."""

    def __init__(self, workers: int, threads: int, *gateway_args: str, kv_cache_mb: int = 512):
        port, control = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.gateway = Proc("gateway", "--port", str(port), "--control-port", str(control), *gateway_args)
        self.gateway.wait_for("fleetserve gateway ready")
        self.workers = [
            Proc(
                "worker",
                "--gateway",
                f"127.0.0.1:{control}",
                "--name",
                f"w{i}",
                "--threads",
                str(threads),
                "--kv-cache-mb",
                str(kv_cache_mb),
            )  # fmt: skip
            for i in range(workers)
        ]
        for w in self.workers:
            w.wait_for("fleetserve worker ready")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            body = httpx.get(self.url + "/ready", timeout=30).json()
            if sum(m["healthy_workers"] for m in body.get("models", {}).values()) == workers:
                return
            time.sleep(0.2)
        raise TimeoutError("workers did not become ready")

    def close(self) -> None:
        for p in [*self.workers, self.gateway]:
            p.stop()
