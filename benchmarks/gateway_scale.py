"""The gateway's cost as the fleet grows: heartbeats and routing with 10, 100 and 1,000 workers.

For each fleet size, one real gateway (``fleetserve gateway``, a process of its own) and that many simulated
workers (``fleetserve.bench.sim_workers``: 250 to a process, each registered through the real WorkerAgent, with a
heartbeat a second carrying its load and a delta of 4 prefix-cache block hashes out of 256, and answering
generations with fixed tokens over the real Worker gRPC service). With ``--per-relay K`` every K of them
heartbeat through one heartbeat relay, as the workers of one machine do through their node agent. Then:

* **heartbeats**: the gateway's CPU (user + system, from /proc) over ``--idle`` seconds with no requests, as a
  share of one core, and its resident memory;
* **routing**: an open-loop load of ``--rate`` completions a second for ``--seconds`` (48-token prompts given as
  token ids, of which the first 32 are one of 64 shared prefixes; one output token), from a client process of its
  own; reports the rate achieved, the client's end-to-end latency and the gateway's own routing decision times
  (``GET /admin/routing`` → ``decisions``: finding a worker with room for the request, p50/p99 of the latest
  10,000), and the gateway's CPU while loaded;
* **decisions alone** (``--part decide``, in this process): the gateway's admission and prefix-aware policy over a
  registry of N workers fed the same heartbeats, timed per decision without HTTP or gRPC, for the growth with N.

    python benchmarks/gateway_scale.py                       # 10, 100, 1000 workers, both parts
    python benchmarks/gateway_scale.py --sizes 1000 --part fleet
    python benchmarks/gateway_scale.py --sizes 1000 --part fleet --per-relay 8 --output /tmp/relayed.json

Writes ``benchmarks/results/gateway-scale.json``. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import time
from pathlib import Path

import httpx

from fleetserve.bench.local_fleet import free_port
from fleetserve.bench.results import cpu_description, created_now
from fleetserve.protocol.security import SECRET_ENV
from fleetserve.supervisor import Child, ChildSpec

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "gateway-scale.json"
MODEL = "smollm2-135m-instruct"
PER_PROCESS = 250
PREFIXES = 64
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def cpu_share(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU over the next ``seconds``, as a share of one core."""
    before, started = [cpu_seconds(p) for p in pids], time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return [(cpu_seconds(p) - b) / wall for p, b in zip(pids, before, strict=True)]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    heads = [[rng.randrange(100, 49000) for _ in range(32)] for _ in range(PREFIXES)]
    return [rng.choice(heads) + [rng.randrange(100, 49000) for _ in range(16)] for _ in range(count)]


async def open_loop(url: str, rate: float, seconds: float, seed: int) -> dict:
    """Completions sent at ``rate`` a second for ``seconds`` whatever the answers do; latencies of those answered."""
    total = int(rate * seconds)
    bodies = prompts(total, seed)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(prompt: list[int]) -> None:
            started = time.perf_counter()
            try:
                reply = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                )
                if reply.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[str(reply.status_code)] = errors.get(str(reply.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        tasks = []
        started = time.perf_counter()
        for i, prompt in enumerate(bodies):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(prompt)))
        sent_s = time.perf_counter() - started
        await asyncio.gather(*tasks)
        took = time.perf_counter() - started
    latencies.sort()

    def q(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3, 2) if latencies else 0.0

    return {
        "offered_per_s": rate,
        "sent": total,
        "send_s": round(sent_s, 2),
        "answered": len(latencies),
        "answered_per_s": round(len(latencies) / took, 1),
        "errors": errors,
        "latency_ms": {"p50": q(0.5), "p99": q(0.99), "mean": round(statistics.fmean(latencies) * 1e3, 2)}
        if latencies
        else {},
    }


def client_main(url: str, rate: float, seconds: float, seed: int) -> None:
    print(json.dumps(asyncio.run(open_loop(url, rate, seconds, seed))), flush=True)


def workers_ready(url: str, count: int, timeout_s: float) -> float:
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        try:
            listed = httpx.get(url + "/admin/workers", timeout=30).json()["workers"]
            if sum(w["state"] == "healthy" for w in listed) == count:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{count} workers did not all register within {timeout_s} s")


def pinned(argv: list[str], cpus: str) -> list[str]:
    """``argv`` run on ``cpus`` only ("" leaves it unpinned)."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def fleet_size(n: int, args: argparse.Namespace) -> dict:
    env = {SECRET_ENV: secrets.token_urlsafe(24)}
    # On a small machine the gateway gets a core of its own and the simulation (workers, client) the rest, so
    # that what is measured of the gateway is its own work, not its waits for a core.
    cores = os.cpu_count() or 1
    gateway_cpus, rest_cpus = ("0", f"1-{cores - 1}") if args.pin and cores >= 2 else ("", "")
    port, control = free_port(), free_port()
    gateway = Child(
        ChildSpec(
            "gateway",
            pinned([sys.executable, "-m", "fleetserve", "gateway", "--port", str(port), "--control-port", str(control),
                    "--heartbeat-timeout", "10", "--heartbeat-interval", str(args.heartbeat_interval),
                    "--max-queue", "100000"], gateway_cpus),
            env, ready="fleetserve gateway ready",
        )
    ).launch()  # fmt: skip
    sims: list[Child] = []
    client: Child | None = None
    try:
        gateway.wait_ready(120)
        url = f"http://127.0.0.1:{port}"
        for first in range(0, n, PER_PROCESS):
            count = min(PER_PROCESS, n - first)
            argv = [sys.executable, "-m", "fleetserve.bench.sim_workers", "--gateway", f"127.0.0.1:{control}"]
            argv += ["--count", str(count), "--first", str(first)]
            argv += ["--per-relay", str(args.per_relay), "--relay-flush", str(args.heartbeat_interval)]
            sims.append(
                Child(ChildSpec(f"sim-{first}", pinned(argv, rest_cpus), env, ready="sim workers ready")).launch()
            )
        for sim in sims:
            sim.wait_ready(300)
        registered_s = workers_ready(url, n, 300)
        time.sleep(args.settle)
        idle = cpu_share([gateway.pid, *(s.pid for s in sims)], args.idle)
        row = {
            "workers": n,
            "registered_s": round(registered_s, 1),
            "heartbeats": {
                "gateway_cpu_share_of_core": round(idle[0], 4),
                "sim_processes_cpu_share_of_core": round(sum(idle[1:]), 3),
                "gateway_rss_mib": round(rss_mib(gateway.pid), 1),
            },
        }
        print(f"{n} workers: heartbeats {json.dumps(row['heartbeats'])}", flush=True)
        client = Child(
            ChildSpec(
                "client",
                pinned(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        url,
                        "--rate",
                        str(args.rate),
                        "--seconds",
                        str(args.seconds),
                    ],
                    rest_cpus,
                ),
                {},
            )
        ).launch()
        before = cpu_seconds(gateway.pid)
        started = time.monotonic()
        client.popen.wait(args.seconds * 10 + 120)
        loaded_cpu = (cpu_seconds(gateway.pid) - before) / (time.monotonic() - started)
        load = json.loads(client.output()[-1])
        decisions = httpx.get(url + "/admin/routing", timeout=60).json()["decisions"]
        row["routing"] = {
            **load,
            "gateway_cpu_share_of_core": round(loaded_cpu, 3),
            "gateway_rss_mib": round(rss_mib(gateway.pid), 1),
            "decision_us": decisions,
        }
        print(f"{n} workers: routing {json.dumps(row['routing'])}", flush=True)
        return row
    finally:
        if client is not None:
            client.stop(10)
        for sim in sims:
            sim.stop(30)
        gateway.stop(30)


def decide_alone(n: int, decisions: int, seed: int) -> dict:
    """The gateway's routing decision over ``n`` registered workers, in this process: each worker's record fed a
    heartbeat with 256 block hashes; requests of the fleet part's prompts; every lease held for 8 decisions."""
    from fleetserve.gateway.admission import Admission
    from fleetserve.gateway.policies import make_policy
    from fleetserve.gateway.policies.base import RouteRequest
    from fleetserve.gateway.registry import WorkerRegistry
    from fleetserve.protocol import fleet_pb2 as pb

    rng = random.Random(seed)
    registry = WorkerRegistry(connect=lambda address: (None, object()))
    for i in range(n):
        info = pb.WorkerInfo(
            name=f"sim-{i}", address=f"127.1.{i // 250}.{i % 250 + 1}:1", model=MODEL, kv_blocks_total=1024,
            block_size=16, max_num_seqs=8,
        )  # fmt: skip
        record = registry.register(info)
        hashes = pb.BlockHashDelta(reset=True, added=sorted(rng.getrandbits(63) for _ in range(256)))
        registry.heartbeat(
            pb.HeartbeatReport(
                worker_id=record.worker_id, stats=pb.WorkerStats(kv_blocks_total=1024), block_hashes=hashes
            )
        )
    policy = make_policy("prefix-aware")
    admission = Admission(registry, lambda model: policy, max_queue=10**6)
    held = []

    async def run() -> list[float]:
        times = []
        for prompt in prompts(decisions, seed):
            started = time.perf_counter()
            lease = await admission.acquire(MODEL, RouteRequest(MODEL, prompt_token_ids=prompt), len(prompt) + 1)
            times.append(time.perf_counter() - started)
            held.append(lease)
            if len(held) > 8:
                held.pop(0).release()
        return times

    times = sorted(asyncio.run(run()))
    return {
        "workers": n,
        "decisions": decisions,
        "p50_us": round(times[len(times) // 2] * 1e6, 1),
        "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
        "mean_us": round(statistics.fmean(times) * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--part", choices=("both", "fleet", "decide"), default="both")
    parser.add_argument("--rate", type=float, default=1000.0, help="completions a second offered (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of heartbeats measured (default 10)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after registration before measuring")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=1.0, help="seconds between a worker's heartbeats (default 1)"
    )
    parser.add_argument(
        "--per-relay", type=int, default=0,
        help="workers per heartbeat relay, as behind one node agent (default 0: every worker heartbeats directly)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON result (default {RESULTS})")
    parser.add_argument("--decisions", type=int, default=20000, help="decisions timed per size (decide part)")
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True,
        help="run the gateway on CPU 0 and the simulated workers and client on the others (default: on)",
    )  # fmt: skip
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client_main(args.client, args.rate, args.seconds, 0)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict = {
        "date": created_now(),
        "cpu": cpu_description(),
        "pinned": bool(args.pin and (os.cpu_count() or 1) >= 2),
        "heartbeat_interval_s": args.heartbeat_interval,
        "workers_per_relay": args.per_relay,
        "rate": args.rate,
        "seconds": args.seconds,
    }
    if args.part in ("both", "decide"):
        result["decide"] = [decide_alone(n, args.decisions, 0) for n in sizes]
        for row in result["decide"]:
            print(f"decide alone: {json.dumps(row)}", flush=True)
    if args.part in ("both", "fleet"):
        result["fleet"] = [fleet_size(n, args) for n in sizes]
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
