"""`fleetserve up`: a gateway plus N local workers as child processes, ready when /ready says so.

The machine's cores are split between the workers (torch threads each), since workers that each use every core
slow one another down. Ctrl-C (or SIGTERM) stops every process it started: SIGTERM first, SIGKILL after a grace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


@dataclass
class UpOptions:
    model: str = "smollm2-135m-instruct"
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 8000
    control_port: int = 50050
    threads_per_worker: int | None = None
    """None: the machine's cores divided between the workers (at least 1)."""
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 600.0


def _pipe(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stderr.write(f"[{prefix}] {line}")


def wait_ready(
    url: str, procs: list[subprocess.Popen], timeout_s: float, workers: int, headers: dict | None = None
) -> dict:
    """Poll GET url/ready until it is ready with ``workers`` healthy workers; raise if a child dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a process exited with code {p.returncode} before the fleet was ready")
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
        time.sleep(0.5)
    raise TimeoutError(f"the fleet was not ready after {timeout_s:.0f}s: {last}")


def stop_all(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for p in reversed(procs):  # workers first (they drain and deregister), the gateway last
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(opts: UpOptions) -> list[subprocess.Popen]:
    """Start the gateway and the workers; returns the processes, gateway first."""
    exe = [sys.executable, "-m", "fleetserve"]
    threads = opts.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, opts.workers))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": env}
    procs = [
        subprocess.Popen(
            [
                *exe,
                "gateway",
                "--host",
                opts.host,
                "--port",
                str(opts.port),
                "--control-port",
                str(opts.control_port),
                *opts.gateway_args,
            ],
            **common,
        )
    ]
    for i in range(opts.workers):
        procs.append(
            subprocess.Popen(
                [
                    *exe,
                    "worker",
                    "--model",
                    opts.model,
                    "--gateway",
                    f"127.0.0.1:{opts.control_port}",
                    "--name",
                    f"worker-{i}",
                    "--threads",
                    str(threads),
                    *opts.worker_args,
                ],
                **common,
            )
        )
    names = ["gateway"] + [f"worker-{i}" for i in range(opts.workers)]
    for p, name in zip(procs, names):
        threading.Thread(target=_pipe, args=(p, name), daemon=True).start()
    return procs


def run_up(opts: UpOptions, api_key: str | None = None) -> int:
    url = f"http://{opts.host}:{opts.port}"
    print(f"starting a gateway and {opts.workers} worker(s) on {opts.model} ...", file=sys.stderr, flush=True)
    procs = launch(opts)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            ready = wait_ready(url, procs, opts.ready_timeout_s, opts.workers, headers)
        except (RuntimeError, TimeoutError) as exc:
            print(f"fleetserve up: {exc}", file=sys.stderr, flush=True)
            return 1
        workers = sum(m["healthy_workers"] for m in ready["models"].values())
        print(f"fleetserve is ready: {workers} worker(s) serving {', '.join(ready['models'])}", flush=True)
        print(f"  API:     {url}/v1   (OpenAI-compatible)", flush=True)
        print(f"  health:  {url}/health   readiness: {url}/ready", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while not stopping.is_set():
            if any(p.poll() is not None for p in procs):
                print("fleetserve up: a process exited; stopping the others", file=sys.stderr, flush=True)
                return 1
            stopping.wait(0.5)
        return 0
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        stop_all(procs)
        for s, h in old.items():
            signal.signal(s, h)
