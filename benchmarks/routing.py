"""Routing benchmarks on real fleets started by this script (a gateway and workers on free loopback ports).

``shared-prefix``: the shared-prefix requests (one long system prompt, many questions; 32 tokens each, concurrency
8) through a fleet of 2 workers with ``round-robin`` and then with ``prefix-aware`` routing, each on a fresh fleet,
plus the same load on ONE worker for the hit rate a single cache would get. Reports the prefix-cache hit rate
(cached prompt tokens / prompt tokens, from each answer's usage) and TTFT p50/p99.

``failover``: 32 streamed greedy chat requests on 2 workers; the same run again with one worker killed (SIGKILL)
2 s in. Reports requests lost, how many texts are identical to the undisturbed run, and the extra latency of the
resumed requests (their end-to-end time minus the same requests' time in the undisturbed run).

    python benchmarks/routing.py shared-prefix
    python benchmarks/routing.py failover

Each writes ``benchmarks/results/routing-<scenario>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
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


def _bench_args(
    url: str, scenario: str, concurrency: int, requests: int, output: Path, prompts: Path | None = None
) -> argparse.Namespace:
    parser = http_bench.build_parser()
    return parser.parse_args(
        ["--url", url, "--scenario", scenario, "--concurrency", str(concurrency), "--requests", str(requests)]
        + ["--output", str(output)]
        + (["--prompts", str(prompts)] if prompts else [])
    )


def _grouped_prompts(groups: int, out: Path) -> Path:
    """The shared-prefix prompts split into ``groups`` prefixes: request i opens its system prompt with a line
    naming group i % groups, so groups share no KV block."""
    rows = http_bench.load_prompts(ROOT / "data" / "shared_prefix.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for i, messages in enumerate(rows):
            system, *rest = messages
            tagged = {**system, "content": f"Branch office number {i % groups}. " + system["content"]}
            f.write(json.dumps({"id": i, "messages": [tagged, *rest]}) + "\n")
    return out


def shared_prefix(args: argparse.Namespace) -> dict:
    runs = [
        ("one worker", 1, 2, "prefix-aware"),
        ("round-robin", 2, 1, "round-robin"),
        ("prefix-aware", 2, 1, "prefix-aware"),
    ]
    rows = []
    prompts = _grouped_prompts(args.groups, ROOT / "results" / ".routing-prompts.jsonl") if args.groups > 1 else None
    for label, workers, threads, policy in runs:
        # The single worker gets the whole fleet's cores and KV memory: the hit rate one cache of that size gets.
        kv = args.kv_cache_mb * (2 if workers == 1 else 1)
        fleet = Fleet(workers, threads, "--policy", policy, kv_cache_mb=kv)
        try:
            tmp = ROOT / "results" / f".routing-{policy}-{workers}.json"
            bench = _bench_args(fleet.url, "shared-prefix", args.concurrency, args.requests, tmp, prompts)
            result = asyncio.run(http_bench.run_async(bench, log=lambda _: None))
            tmp.unlink(missing_ok=True)
            row = result["rows"][0]
            routing = httpx.get(fleet.url + "/admin/routing", timeout=10).json()
            rows.append(
                {
                    "run": label,
                    "workers": workers,
                    "threads_per_worker": threads,
                    "kv_cache_mb_per_worker": kv,
                    "policy": policy,
                    "completed": row["completed"],
                    "requests": row["requests"],
                    "prefix_cache_hit_rate": row["prefix_cache_hit_rate"],
                    "ttft_p50_s": row["ttft_s"]["p50"],
                    "ttft_p99_s": row["ttft_s"]["p99"],
                    "output_tokens_per_s": row["output_tokens_per_s"],
                    "policy_counters": routing["policies"].get(MODEL),
                }
            )
            print(f"{label}: {json.dumps(rows[-1])}", flush=True)
        finally:
            fleet.close()
    single, rr, pa = rows
    summary = {
        "hit_rate_vs_one_worker": pa["prefix_cache_hit_rate"] / single["prefix_cache_hit_rate"]
        if single["prefix_cache_hit_rate"]
        else None,
        "ttft_p50_speedup_vs_round_robin": rr["ttft_p50_s"] / pa["ttft_p50_s"] if pa["ttft_p50_s"] else None,
    }
    if prompts:
        prompts.unlink(missing_ok=True)
    return {
        "groups": args.groups,
        "kv_cache_mb_per_worker": args.kv_cache_mb,
        "concurrency": args.concurrency,
        "rows": rows,
        "summary": summary,
        "goals": {"hit_rate_vs_one_worker": 0.9, "ttft_p50_speedup": 2.0},
    }


async def _streams(url: str, prompts: list[list[dict]], max_tokens: int) -> list[dict]:
    async def one(client: httpx.AsyncClient, messages: list[dict]) -> dict:
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        start = time.perf_counter()
        text, rid, error = "", "", None
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                rid = resp.headers.get("x-request-id", "")
                if resp.status_code != 200:
                    return {"text": "", "id": rid, "error": f"HTTP {resp.status_code}", "e2e_s": 0.0}
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]
                        for choice in event.get("choices", ()):
                            text += choice["delta"].get("content") or ""
        except httpx.HTTPError as exc:
            error = str(exc)
        return {"text": text, "id": rid, "error": error, "e2e_s": time.perf_counter() - start}

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(one(client, m) for m in prompts))


def failover(args: argparse.Namespace) -> dict:
    prompts = http_bench.load_prompts(ROOT / "data" / "prompts.jsonl")[: args.streams]
    fleet = Fleet(2, 1, "--policy", "prefix-aware")
    try:
        reference = asyncio.run(_streams(fleet.url, prompts, args.max_tokens))

        async def disturbed() -> list[dict]:
            task = asyncio.create_task(_streams(fleet.url, prompts, args.max_tokens))
            await asyncio.sleep(args.kill_after)
            fleet.workers[0].popen.send_signal(signal.SIGKILL)
            return await task

        results = asyncio.run(disturbed())
        traces = [httpx.get(f"{fleet.url}/v1/requests/{r['id']}/trace", timeout=10).json() for r in results]
    finally:
        fleet.close()
    lost = sum(1 for r in results if r["error"] or not r["text"])
    identical = sum(1 for r, ref in zip(results, reference, strict=True) if r["text"] == ref["text"])
    resumed = [i for i, t in enumerate(traces) if len(t.get("attempts", ())) > 1]
    extra = [results[i]["e2e_s"] - reference[i]["e2e_s"] for i in resumed]
    return {
        "streams": len(prompts),
        "max_tokens": args.max_tokens,
        "kill_after_s": args.kill_after,
        "requests_lost": lost,
        "identical_text": identical,
        "resumed_requests": len(resumed),
        "resumed_extra_latency_s": {
            "mean": statistics.mean(extra) if extra else None,
            "max": max(extra) if extra else None,
        },
        "e2e_p50_s": {
            "undisturbed": statistics.median(r["e2e_s"] for r in reference),
            "with_kill": statistics.median(r["e2e_s"] for r in results),
        },
        "goals": {"requests_lost": 0, "identical_text": len(prompts)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    sp = sub.add_parser("shared-prefix", help="round-robin vs prefix-aware on 2 workers, and one worker alone")
    sp.add_argument("--concurrency", type=int, default=8)
    sp.add_argument("--requests", type=int, default=64)
    sp.add_argument("--groups", type=int, default=1, help="distinct system prompts (default 1: the data as it is)")
    sp.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker (default 512)")
    fo = sub.add_parser("failover", help="32 streams, one of 2 workers killed 2 s in")
    fo.add_argument("--streams", type=int, default=32)
    fo.add_argument("--max-tokens", type=int, default=64)
    fo.add_argument("--kill-after", type=float, default=2.0)
    args = parser.parse_args()
    result = shared_prefix(args) if args.scenario == "shared-prefix" else failover(args)
    result = {
        "benchmark": "routing",
        "scenario": args.scenario,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/routing.py " + " ".join(sys.argv[1:]),
        **result,
    }
    suffix = f"-{args.groups}-groups" if getattr(args, "groups", 1) > 1 else ""
    out = ROOT / "results" / f"routing-{args.scenario}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
