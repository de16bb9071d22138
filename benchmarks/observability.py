"""What the response cache saves, and what metrics and tracing cost, on fleets this script starts.

``cache``: 64 greedy chat requests (64 tokens) at concurrency 4 on a gateway with ``--response-cache memory``
and 2 workers; every fourth request repeats an earlier prompt (a quarter of the load). Each request's trace
says whether it was a hit. Reports the hit rate and the end-to-end latency p50 of hits and of misses.

``telemetry``: the ``chat`` scenario at concurrency 16 (64 requests x 64 tokens) on a gateway with metrics and
tracing and on one started with ``--no-telemetry``, alternating (with, without, with, without) on fresh fleets
of 2 workers, so slow drift of the machine hits both sides alike. Reports tokens/s of each run and the ratio of
the sums.

``telemetry-cpu``: the CPU time of one 64-token request's telemetry (trace and metric updates), in-process.

    python benchmarks/observability.py cache
    python benchmarks/observability.py telemetry --rounds 4
    python benchmarks/observability.py telemetry-cpu

Each writes ``benchmarks/results/observability-<scenario>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from fleetserve.bench import http_bench
from fleetserve.bench.local_fleet import Fleet

ROOT = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"


async def _cache_run(url: str, prompts: list[list[dict]], concurrency: int, max_tokens: int) -> list[dict]:
    order = []
    fresh = iter(range(len(prompts)))
    for i in range(64):
        order.append(order[i // 4 * 4 - 4] if i % 4 == 3 and i >= 4 else next(fresh))  # every 4th repeats one
    results: list[dict] = [{} for _ in order]
    queue = asyncio.Queue()
    for i in range(len(order)):
        queue.put_nowait(i)

    async def lane(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": MODEL, "messages": prompts[order[i]], "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body)
            e2e = time.perf_counter() - start
            trace = (await client.get(f"{url}/v1/requests/{r.headers['x-request-id']}/trace")).json()
            hit = any(s["name"] == "cache_lookup" and s["attributes"].get("hit") for s in trace["spans"])
            results[i] = {"prompt": order[i], "status": r.status_code, "e2e_s": e2e, "hit": hit}

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(lane(client) for _ in range(concurrency)))
    return results


def cache(args: argparse.Namespace) -> dict:
    prompts = http_bench.load_prompts(ROOT / "data" / "prompts.jsonl")
    fleet = Fleet(2, 1, "--response-cache", "memory")
    try:
        results = asyncio.run(_cache_run(fleet.url, prompts, args.concurrency, args.max_tokens))
    finally:
        fleet.close()
    hits = [r["e2e_s"] for r in results if r["hit"]]
    misses = [r["e2e_s"] for r in results if not r["hit"]]
    return {
        "requests": len(results),
        "repeats": sum(1 for i in range(len(results)) if i % 4 == 3 and i >= 4),
        "failed": sum(1 for r in results if r["status"] != 200),
        "hits": len(hits),
        "hit_rate": len(hits) / len(results),
        "e2e_p50_s": {
            "hits": statistics.median(hits) if hits else None,
            "misses": statistics.median(misses) if misses else None,
        },
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }


def telemetry(args: argparse.Namespace) -> dict:
    runs = []
    for round_no in range(args.rounds):
        for label, flags in (("with", ()), ("without", ("--no-telemetry",))):
            fleet = Fleet(2, 1, *flags)
            try:
                out = ROOT / "results" / f".observability-{label}.json"
                bench = http_bench.build_parser().parse_args(
                    ["--url", fleet.url, "--scenario", "chat", "--concurrency", "16", "--requests", "64"]
                    + ["--output", str(out)]
                )
                row = asyncio.run(http_bench.run_async(bench, log=lambda _: None))["rows"][0]
                out.unlink(missing_ok=True)
            finally:
                fleet.close()
            runs.append(
                {
                    "round": round_no + 1,
                    "telemetry": label,
                    "output_tokens_per_s": row["output_tokens_per_s"],
                    "ttft_p50_s": row["ttft_s"]["p50"],
                    "completed": row["completed"],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    with_tps = sum(r["output_tokens_per_s"] for r in runs if r["telemetry"] == "with")
    without_tps = sum(r["output_tokens_per_s"] for r in runs if r["telemetry"] == "without")
    return {"runs": runs, "throughput_with_over_without": with_tps / without_tps, "goal_cost_below": 0.02}


def telemetry_cpu(args: argparse.Namespace) -> dict:
    """The gateway's telemetry work for one 64-token request, timed in-process: its trace (11 spans and an
    attempt) and its metric updates (63 inter-token observations, TTFT, E2E, queue, counters)."""
    from fleetserve.telemetry.metrics import GatewayMetrics
    from fleetserve.telemetry.tracing import TraceStore

    metrics, store = GatewayMetrics(), TraceStore()

    def one(i: int) -> None:
        t = store.start(f"r{i}", MODEL)
        t.add_span("receive", 0.0)
        t.add_span("preprocess", 0.0, prompt_tokens=50)
        metrics.queue_time_seconds.labels(model=MODEL).observe(0.001)
        t.add_span("queue", 0.0)
        attempt = t.begin_attempt("w0", "127.0.0.1:1", 0, 0.0)
        t.add_span("prefill", 0.0, worker="w0")
        t.add_span("first_token", 0.0, 0.0)
        metrics.time_to_first_token_seconds.labels(model=MODEL).observe(0.1)
        for _ in range(63):
            metrics.inter_token_latency_seconds.labels(model=MODEL).observe(0.05)
        attempt.tokens = 64
        t.end_attempt(attempt, "finished")
        metrics.e2e_request_latency_seconds.labels(model=MODEL).observe(3.0)
        metrics.prompt_tokens_total.labels(model=MODEL).inc(50)
        metrics.generation_tokens_total.labels(model=MODEL).inc(64)
        t.add_span("decode", 0.0)
        t.add_span("postprocess", 0.0)
        t.add_span("finish", 0.0, 0.0)
        metrics.requests_total.labels(model=MODEL, outcome="ok").inc()
        t.close()

    start = time.perf_counter()
    for i in range(args.requests):
        one(i)
    per_request = (time.perf_counter() - start) / args.requests
    return {"requests": args.requests, "cpu_us_per_request": per_request * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    c = sub.add_parser("cache", help="a quarter of the requests repeat; hit rate and p50 of hits vs misses")
    c.add_argument("--concurrency", type=int, default=4)
    c.add_argument("--max-tokens", type=int, default=64)
    t = sub.add_parser("telemetry", help="chat at c=16 with and without metrics and tracing")
    t.add_argument("--rounds", type=int, default=2)
    cpu = sub.add_parser("telemetry-cpu", help="CPU time of one request's telemetry, in-process")
    cpu.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    result = {"cache": cache, "telemetry": telemetry, "telemetry-cpu": telemetry_cpu}[args.scenario](args)
    result = {
        "benchmark": "observability",
        "scenario": args.scenario,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/observability.py " + " ".join(sys.argv[1:]),
        **result,
    }
    out = ROOT / "results" / f"observability-{args.scenario}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
