"""Disaggregation benchmark: short chats streaming while long prompts arrive, on a replica pair against a
prefill + decode pair.

Both runs have two workers of the same threads (the machine's cores split equally). The load: ``--concurrency``
streams of short chat requests (greedy, ``ignore_eos``, 64 tokens each) for ``--short`` requests in all, while a
long prompt (about 1,500 tokens, 16 output tokens) arrives every ``--every`` seconds. Measured per run: the
inter-token latency p50/p99 of the short requests (the gaps between a stream's token events), the TTFT of the long
ones, the output tokens/s of the whole load, and, disaggregated, the KV each request moved (bytes and transfer
time from the decode worker's report, in the request's trace) against its prompt length. Greedy texts of both
runs are compared.

    python benchmarks/disaggregated.py [--short 32] [--concurrency 8] [--every 10]

Writes ``benchmarks/results/disaggregated.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from fleetserve.bench import http_bench
from fleetserve.bench.local_fleet import Fleet
from fleetserve.bench.results import cpu_description, write_json

ROOT = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
SHORT_TOKENS = 64
LONG_TOKENS = 16


def long_prompt(i: int) -> str:
    """About 1,500 tokens; each long prompt its own (no prefix cache between them)."""
    notes = " ".join(f"Note {j} on subject {i}: it matters for reason {j * 7 % 13}." for j in range(100))
    return f"{notes} Summarize the notes on subject {i} in one sentence."


async def stream(
    client: httpx.AsyncClient, url: str, messages: list, max_tokens: int, session: str | None = None
) -> dict:
    """One streamed chat: its text, request id, TTFT and the gaps between its token events."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    headers = {"X-Session-Id": session} if session else None
    start = time.perf_counter()
    times: list[float] = []
    text = ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        rid = r.headers.get("x-request-id", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta:
                times.append(time.perf_counter())
                text += delta
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"id": rid, "text": text, "ttft_s": times[0] - start if times else None, "gaps": gaps, "events": len(times)}


async def load(url: str, args: argparse.Namespace) -> dict:
    prompts = http_bench.load_prompts(ROOT / "data" / "prompts.jsonl")
    shorts = [prompts[i % len(prompts)] for i in range(args.short)]
    results: dict[str, list] = {"short": [], "long": []}
    async with httpx.AsyncClient(timeout=600) as client:
        queue = list(enumerate(shorts))
        started = time.perf_counter()

        async def short_worker():
            while queue:
                _, messages = queue.pop(0)
                results["short"].append(await stream(client, url, messages, SHORT_TOKENS))

        async def long_arrivals():
            i = 0
            while queue:
                await asyncio.sleep(args.every)
                messages = [{"role": "user", "content": long_prompt(i)}]
                results["long"].append(asyncio.create_task(stream(client, url, messages, LONG_TOKENS)))
                i += 1

        await asyncio.gather(*(short_worker() for _ in range(args.concurrency)), long_arrivals())
        results["long"] = [await t for t in results["long"]]
        elapsed = time.perf_counter() - started
    return {**results, "elapsed_s": elapsed}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def transfers(url: str, requests: list[dict]) -> list[dict]:
    """Each request's prompt length and the KV its decode worker fetched (from its trace)."""
    rows = []
    for r in requests:
        trace = httpx.get(f"{url}/v1/requests/{r['id']}/trace", timeout=10).json()
        spans = {s["name"]: s for s in trace.get("spans", [])}
        kv = spans.get("kv_transfer")
        if kv is None:
            continue
        attrs = kv.get("attributes", {})
        prompt_tokens = spans.get("preprocess", {}).get("attributes", {}).get("prompt_tokens")
        rows.append(
            {
                "prompt_tokens": prompt_tokens,
                "tokens_sent": attrs.get("tokens"),
                "cached_tokens": attrs.get("cached_tokens"),
                "bytes": attrs.get("bytes"),
                "transfer_s": kv.get("duration"),
                "fallback": attrs.get("fallback", ""),
            }
        )
    return rows


async def session_turns(url: str, conversations: int = 3) -> dict:
    """TTFT of a ~1,000-token conversation's first turn and of its second turn in the same session (whose
    history the worker kept pinned), on an idle fleet; the means over ``conversations``."""
    first, second = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(conversations):
            notes = " ".join(f"Fact {j} of story {i}: the {j}th lantern was lit at dusk." for j in range(60))
            history = [{"role": "user", "content": notes + " What happened first?"}]
            turn = await stream(client, url, history, 16, session=f"bench-{i}")
            first.append(turn["ttft_s"])
            history += [{"role": "assistant", "content": turn["text"]}, {"role": "user", "content": "And then?"}]
            second.append((await stream(client, url, history, 16, session=f"bench-{i}"))["ttft_s"])
    return {
        "first_turn_ttft_s": statistics.mean(first),
        "second_turn_ttft_s": statistics.mean(second),
        "second_over_first": statistics.mean(second) / statistics.mean(first),
    }


def one_run(label: str, roles: tuple[str, ...], threads: int, args: argparse.Namespace) -> dict:
    fleet = Fleet(2, threads, kv_cache_mb=256, roles=roles)
    try:
        warm = asyncio.run(load_warmup(fleet.url))
        assert warm, "warm-up failed"
        out = asyncio.run(load(fleet.url, args))
        gaps = [g for r in out["short"] for g in r["gaps"]]
        tokens = sum(r["events"] for r in out["short"] + out["long"])
        row = {
            "run": label,
            "roles": list(roles),
            "threads_per_worker": threads,
            "short_requests": len(out["short"]),
            "long_requests": len(out["long"]),
            "short_itl_p50_s": percentile(gaps, 0.5),
            "short_itl_p99_s": percentile(gaps, 0.99),
            "short_ttft_p50_s": percentile([r["ttft_s"] for r in out["short"] if r["ttft_s"]], 0.5),
            "long_ttft_p50_s": percentile([r["ttft_s"] for r in out["long"] if r["ttft_s"]], 0.5),
            "long_ttft_max_s": max((r["ttft_s"] for r in out["long"] if r["ttft_s"]), default=None),
            "output_tokens_per_s": tokens / out["elapsed_s"],
            "elapsed_s": out["elapsed_s"],
        }
        moved = transfers(fleet.url, out["short"] + out["long"])
        if moved:
            long_moves = [m for m in moved if (m["prompt_tokens"] or 0) > 1000]
            short_moves = [m for m in moved if (m["prompt_tokens"] or 0) <= 1000]
            row["kv"] = {
                "transfers": len(moved),
                "fallbacks": sum(1 for m in moved if m["fallback"]),
                "short_mean_bytes": statistics.mean(m["bytes"] for m in short_moves) if short_moves else None,
                "short_mean_transfer_s": statistics.mean(m["transfer_s"] for m in short_moves) if short_moves else None,
                "long_mean_bytes": statistics.mean(m["bytes"] for m in long_moves) if long_moves else None,
                "long_mean_transfer_s": statistics.mean(m["transfer_s"] for m in long_moves) if long_moves else None,
                "by_prompt_length": sorted(
                    ({k: m[k] for k in ("prompt_tokens", "tokens_sent", "bytes", "transfer_s")} for m in moved),
                    key=lambda m: m["prompt_tokens"] or 0,
                )[:: max(1, len(moved) // 12)],
            }
        row["sample_texts"] = [r["text"] for r in sorted(out["short"], key=lambda r: r["text"])][:8]
        row["sessions"] = asyncio.run(session_turns(fleet.url))
        print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'sample_texts'})}")
        return row
    finally:
        fleet.close()


async def load_warmup(url: str) -> bool:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await stream(client, url, [{"role": "user", "content": "Hello"}], 4)
        return bool(r["text"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=32, help="short chat requests in all")
    parser.add_argument("--concurrency", type=int, default=8, help="short requests streaming at once")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between long prompts")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="per worker")
    args = parser.parse_args()
    replicas = one_run("replica pair", ("replica", "replica"), args.threads, args)
    split = one_run("prefill + decode", ("prefill", "decode"), args.threads, args)
    summary = {
        "short_itl_p99_replicas_over_disaggregated": (
            replicas["short_itl_p99_s"] / split["short_itl_p99_s"] if split["short_itl_p99_s"] else None
        ),
        "throughput_disaggregated_vs_replicas": split["output_tokens_per_s"] / replicas["output_tokens_per_s"],
        "long_ttft_p50_disaggregated_vs_replicas": (
            split["long_ttft_p50_s"] / replicas["long_ttft_p50_s"] if replicas["long_ttft_p50_s"] else None
        ),
        "same_greedy_texts": replicas["sample_texts"] == split["sample_texts"],
    }
    result = {
        "benchmark": "disaggregated",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_description(),
        "args": vars(args),
        "rows": [{k: v for k, v in r.items() if k != "sample_texts"} for r in (replicas, split)],
        "summary": summary,
        "goals": {"short_itl_p99_replicas_over_disaggregated": 2.0, "throughput_disaggregated_vs_replicas": 0.75},
    }
    out = ROOT / "results" / "disaggregated.json"
    write_json(out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
