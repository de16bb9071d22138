"""Supervision benchmark: how long a killed replica takes to serve again, what a crash costs the requests in flight,
and replicas following a replayed load ramp under autoscaling.

One gateway and one node agent (``fleetserve node``) on this machine; the gateway places a deployment's replicas on
the node. Two parts:

1. **Crash to serving.** Two replicas under a steady load (``--concurrency`` streamed chats of 32 tokens, one after
   another, for the whole part). ``--kills`` times, one replica is killed with SIGKILL; measured each time: from the
   kill to the node agent's new process, to that process registering, and to the gateway having it healthy again.
   Every request sent in the part is counted: answered whole, or lost (an error or a cut stream). Goal: 0 lost.
2. **Load ramp.** The deployment is set to 1..2 replicas with autoscaling (TTFT p90 over 0.5 s, or a queue over 2
   per worker, for 2 s adds one; no request for 10 s goes back to one) and a ramp is replayed: 1, 8, 32, 8, then 0
   concurrent streams (``--ramp``), each for ``--step`` seconds. Sampled every second: offered concurrency, the
   gateway's queue, TTFT p90, desired, planned and serving replicas. The autoscaler's decisions come with their
   reasons. Plotted to docs/img/supervision-ramp.png.

    python benchmarks/supervision.py [--kills 3] [--concurrency 4] [--step 20] [--ramp 1,8,32,8,0] [--ramp-only]

Writes ``benchmarks/results/supervision.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fleetserve.bench.local_fleet import free_port
from fleetserve.bench.results import cpu_description, created_now, write_json
from fleetserve.protocol.security import SECRET_ENV
from fleetserve.supervisor import ChildSpec, Supervisor

ROOT = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
ADMIN = "supervision-benchmark"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
PROMPTS = ["Tell me about rivers.", "Why is the sky blue?", "Name three colors.", "Write a haiku about snow."]


class Load:
    """``concurrency`` streams, each sending one request after another until stopped; counts what happened."""

    def __init__(self, url: str):
        self.url = url
        self.concurrency = 0
        self.sent = self.answered = 0
        self.lost: list[str] = []
        self.stop = False

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        self.sent += 1
        finished = False
        try:
            async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    self.lost.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                    return
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.lost.append(str(event["error"])[:200])
                            return
                        finished = finished or bool(event["choices"][0].get("finish_reason"))
        except httpx.HTTPError as exc:
            self.lost.append(repr(exc)[:200])
            return
        if finished:
            self.answered += 1
        else:
            self.lost.append("the stream ended without a finish reason")

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            running: dict[int, asyncio.Task] = {}
            while not self.stop:
                for slot in [s for s, task in running.items() if task.done()]:
                    del running[slot]  # a slot over the concurrency is not filled again
                for slot in range(self.concurrency):
                    if slot not in running:
                        running[slot] = asyncio.create_task(self.one(client, self.sent))
                await asyncio.sleep(0.05)
            await asyncio.gather(*running.values())


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    resp = httpx.request(method, url + path, json=body, headers=HEADERS, timeout=60)
    resp.raise_for_status()
    return resp.json()


def deployment(url: str) -> dict:
    return admin(url, "GET", "/admin/deployments")["deployments"][0]


def node_workers(url: str) -> list[dict]:
    return admin(url, "GET", "/admin/nodes")["nodes"][0]["workers"]


def wait(check, timeout_s: float = 300.0, step_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(step_s)
    return value


def in_background(load: Load) -> threading.Thread:
    thread = threading.Thread(target=asyncio.run, args=(load.run(),), daemon=True)
    thread.start()
    return thread


def crash_to_serving(url: str, args: argparse.Namespace) -> dict:
    """Part 1: kill a replica under load, ``--kills`` times; each recovery's phases, and the requests' fate."""
    admin(url, "PUT", f"/admin/deployments/{MODEL}", {"replicas": 2, "memory_mb": 1000})
    wait(lambda: (s := deployment(url)["status"])["serving"] == 2 and s["planned"] == 2, step_s=0.5)
    load = Load(url)
    load.concurrency = args.concurrency
    thread = in_background(load)
    recoveries = []
    try:
        for k in range(args.kills):
            time.sleep(5)  # the load settles on both replicas
            victim = node_workers(url)[k % 2]
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.monotonic()

            def restarted(name=victim["name"], pid=victim["pid"]):
                w = next(w for w in node_workers(url) if w["name"] == name)
                return w if w["pid"] not in (0, pid) else None

            wait(restarted)
            started = time.monotonic() - killed

            def registered(name=victim["name"]):
                workers = admin(url, "GET", "/admin/workers")["workers"]
                return any(w["name"] == name and w["state"] == "healthy" for w in workers)

            wait(registered)
            serving = time.monotonic() - killed
            wait(lambda: deployment(url)["status"]["serving"] == 2)
            recoveries.append({"worker": victim["name"], "process_started_s": round(started, 2),
                               "serving_again_s": round(serving, 2)})  # fmt: skip
            print(f"kill {k + 1}: new process after {started:.2f} s, serving again after {serving:.2f} s", flush=True)
        time.sleep(3)
    finally:
        load.stop = True
        thread.join()
    return {"recoveries": recoveries, "requests": {"sent": load.sent, "answered": load.answered,
            "lost": len(load.lost), "lost_reasons": load.lost[:10]}}  # fmt: skip


def load_ramp(url: str, args: argparse.Namespace) -> dict:
    """Part 2: the autoscaled deployment under a replayed ramp; the samples and the decisions."""
    policy = {"queue_per_replica": 2, "ttft_p90_s": 0.5, "window_s": 10, "up_after_s": 2, "up_cooldown_s": 5,
              "down_after_s": 30, "down_cooldown_s": 5, "idle_after_s": 10}  # fmt: skip
    admin(url, "PUT", f"/admin/deployments/{MODEL}", {"replicas": 1, "min_replicas": 1, "max_replicas": 2,
                                                      "autoscale": policy})  # fmt: skip
    wait(lambda: (s := deployment(url)["status"])["serving"] == 1 and s["planned"] == 1, step_s=0.5)
    load = Load(url)
    thread = in_background(load)
    ramp = [int(c) for c in args.ramp.split(",")]
    samples = []
    begin, wall_begin = time.monotonic(), time.time()
    try:
        for level in ramp + [0, 0]:  # two more steps of nothing: back to the minimum
            load.concurrency = level
            step_end = time.monotonic() + args.step
            while time.monotonic() < step_end:
                d = deployment(url)
                signals = (d.get("autoscaling") or {}).get("signals") or {}
                samples.append({"t": round(time.monotonic() - begin, 1), "offered": level,
                                "queued": signals.get("queued", 0), "ttft_p90_s": signals.get("ttft_p90_s"),
                                **{k: d["status"][k] for k in
                                ("desired", "planned", "serving")}})  # fmt: skip
                time.sleep(1)
    finally:
        load.stop = True
        thread.join()
    decisions = [{"t": round(d["at"] - wall_begin, 1), **{k: d[k] for k in ("from", "to", "reason")}}
                 for d in deployment(url)["autoscaling"]["decisions"]]  # fmt: skip
    return {"policy": policy, "ramp": ramp, "step_s": args.step, "samples": samples, "decisions": decisions,
            "requests": {"sent": load.sent, "answered": load.answered, "lost": len(load.lost)}}  # fmt: skip


def plot(ramp: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in ramp["samples"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.step(t, [s["offered"] for s in ramp["samples"]], where="post", label="offered concurrency")
    top.plot(t, [s["queued"] for s in ramp["samples"]], label="queued requests")
    top.set_ylabel("requests")
    top.legend(loc="upper right")
    for key, style in (("desired", "-"), ("serving", "--")):
        bottom.step(t, [s[key] for s in ramp["samples"]], style, where="post", label=f"{key} replicas")
    for d in ramp["decisions"]:
        bottom.axvline(d["t"], color="grey", linewidth=0.8)
    bottom.set_ylim(0, 3)
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    fig.suptitle("Autoscaling under a load ramp (grey lines: decisions)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--step", type=float, default=20.0)
    parser.add_argument("--ramp", default="1,8,32,8,0", help="concurrency of each step (default 1,8,32,8,0)")
    parser.add_argument(
        "--ramp-only", action="store_true", help="skip the crashes; keep their figures from the last run"
    )
    args = parser.parse_args()
    port, control = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {SECRET_ENV: secrets.token_urlsafe(24)}
    logs = tempfile.mkdtemp(prefix="fleetserve-supervision-")
    exe = [sys.executable, "-m", "fleetserve"]
    with Supervisor() as sup:
        gateway = ["gateway", "--port", str(port), "--control-port", str(control), "--admin-key", ADMIN]
        sup.start(ChildSpec("gateway", [*exe, *gateway], env, "fleetserve gateway ready")).wait_ready(120)
        node = ["node", "--gateway", f"127.0.0.1:{control}", "--name", "bench-node", "--max-workers", "2",
                "--cpus", str(os.cpu_count() or 2), "--max-memory-mb", "2400", "--log-dir", logs]  # fmt: skip
        sup.start(ChildSpec("node", [*exe, *node], env, "fleetserve node ready")).wait_ready(120)
        if args.ramp_only:
            crashes = json.loads((ROOT / "results" / "supervision.json").read_text())["crash_to_serving"]
            admin(url, "PUT", f"/admin/deployments/{MODEL}", {"replicas": 1, "memory_mb": 1000})
        else:
            crashes = crash_to_serving(url, args)
        ramp = load_ramp(url, args)
    result = {
        "benchmark": "supervision",
        "created": created_now(),
        "cpu": cpu_description(),
        "settings": {
            "kills": args.kills,
            "concurrency": args.concurrency,
            "threads_per_worker": 1,
            "restart_backoff_s": 1.0,
        },  # fmt: skip
        "crash_to_serving": crashes,
        "load_ramp": ramp,
    }
    write_json(ROOT / "results" / "supervision.json", result)
    plot(ramp, ROOT.parent / "docs" / "img" / "supervision-ramp.png")
    print(json.dumps({k: v for k, v in result.items() if k != "load_ramp"}, indent=2))
    print("decisions:", json.dumps(ramp["decisions"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
