"""Pipeline benchmark: the model on one worker against the same model split over 2 and 3 stage nodes.

Every run uses the same total of torch threads (the machine's cores, or ``--threads``): one worker gets them all,
each stage node an equal share (at least one). Per run, at concurrency 1 and 16 (the ``chat`` scenario: greedy,
``ignore_eos``, 64 tokens): output tokens/s and TTFT p50, and whether every greedy text equals the one worker's;
for pipelines also the per-hop figures the head reports (compute and transfer time per step, bytes per step) and
the bubble (share of the stages' time idle while the pipeline had work). Last, on a fresh 3-stage pipeline under
load, the middle stage is killed (SIGKILL): the time from the kill to the first token of a request sent at that
moment, which waits for the gateway to re-partition onto the two survivors.

    python benchmarks/pipeline.py [--requests 32] [--threads N]

Writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
STAGE_ARGS = ("--max-model-len", "2048")


def _load(url: str, concurrency: int, requests: int) -> tuple[dict, list[str]]:
    out = ROOT / "results" / f".pipeline-c{concurrency}.json"
    args = http_bench.build_parser().parse_args(
        ["--url", url, "--scenario", "chat", "--concurrency", str(concurrency), "--requests", str(requests)]
        + ["--output", str(out)]
    )
    result = asyncio.run(http_bench.run_async(args, log=lambda _: None))
    out.unlink(missing_ok=True)
    return result["rows"][0], _texts(url)


def _texts(url: str) -> list[str]:
    """Greedy texts of 8 chat prompts (the identity check against the one worker)."""
    prompts = http_bench.load_prompts(ROOT / "data" / "prompts.jsonl")[:8]

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            bodies = [{"model": MODEL, "messages": m, "max_tokens": 32, "temperature": 0} for m in prompts]
            answers = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=b) for b in bodies))
            return [a.json()["choices"][0]["message"]["content"] if a.status_code == 200 else a.text for a in answers]

    return asyncio.run(run())


def _pipeline_state(url: str) -> dict:
    answer = httpx.get(url + "/admin/pipelines", timeout=10).json()
    return next((p for p in answer["pipelines"] if p["model"] == MODEL), {})


def _hops(before: dict, after: dict) -> list[dict]:
    """Each stage's mean compute and transfer time and bytes per step over the steps between two states."""
    steps = after.get("steps", 0) - before.get("steps", 0)
    old = {h["name"]: h for h in before.get("mean_hops", [])}
    rows = []
    for h in after.get("mean_hops", []):
        o = old.get(h["name"], {})
        row = {k: h[k] for k in ("name", "layer_start", "layer_end")}
        for k in ("compute_s", "transfer_s", "bytes"):
            total = h[k] * after.get("steps", 0) - o.get(k, 0) * before.get("steps", 0)
            row[k] = total / steps if steps > 0 else None
        rows.append(row)
    return rows


def _fleet(stages: int, threads: int) -> Fleet:
    """One worker, or ``stages`` stage nodes once their pipeline uses every one of them."""
    fleet = Fleet(0 if stages else 1, threads, "--pipeline-cooldown", "1", stages=stages, stage_args=STAGE_ARGS)
    deadline = time.monotonic() + 120
    while stages and len(_pipeline_state(fleet.url).get("stages", [])) < stages:
        if time.monotonic() > deadline:
            fleet.close()
            raise TimeoutError(f"the pipeline never used all {stages} stage nodes: {_pipeline_state(fleet.url)}")
        time.sleep(0.5)
    while stages and not httpx.get(fleet.url + "/ready", timeout=30).json().get("ready"):
        time.sleep(0.2)
    return fleet


def one_run(label: str, stages: int, threads: int, args: argparse.Namespace, reference: list[str] | None) -> dict:
    per = max(1, threads // max(1, stages)) if stages else threads
    fleet = _fleet(stages, per)
    try:
        row: dict = {"run": label, "stages": stages, "threads_per_process": per}
        texts: list[str] = []
        for c in (1, 16):
            before = _pipeline_state(fleet.url) if stages else {}
            load, texts = _load(fleet.url, c, args.requests if c > 1 else max(4, args.requests // 4))
            row[f"c{c}"] = {
                "output_tokens_per_s": load["output_tokens_per_s"],
                "ttft_p50_s": load["ttft_s"]["p50"],
                "completed": load["completed"],
                "requests": load["requests"],
            }
            if stages:
                time.sleep(2.5)  # the head's next heartbeat carries the last steps
                state = _pipeline_state(fleet.url)
                row[f"c{c}"]["bubble"] = state.get("bubble")
                row[f"c{c}"]["steps"] = state.get("steps", 0) - before.get("steps", 0)
                row[f"c{c}"]["hops"] = _hops(before, state)
        row["texts"] = texts
        row["identical_to_one_worker"] = None if reference is None else texts == reference
        print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'texts'})}", flush=True)
        return row
    finally:
        fleet.close()


def recovery(threads: int) -> dict:
    """Kill the middle of 3 stages under load; time from the kill to the first token of a request sent then."""
    fleet = _fleet(3, max(1, threads // 3))
    try:
        before = _pipeline_state(fleet.url)
        middle = before["stages"][1]["name"]
        victim = next(w for w in fleet.workers if w.name == middle)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 16}

        async def run() -> float:
            async with httpx.AsyncClient(timeout=600) as client:
                load = [
                    asyncio.create_task(client.post(fleet.url + "/v1/chat/completions", json=body)) for _ in range(8)
                ]
                await asyncio.sleep(1.0)
                victim.popen.send_signal(signal.SIGKILL)
                killed = time.perf_counter()
                async with client.stream(
                    "POST", fleet.url + "/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and '"content"' in line:
                            break
                first = time.perf_counter() - killed
                await asyncio.gather(*load)
                return first

        first_token_s = asyncio.run(run())
        after = _pipeline_state(fleet.url)
        return {
            "killed": middle,
            "first_token_after_kill_s": first_token_s,
            "stages_before": [s["name"] for s in before["stages"]],
            "stages_after": [s["name"] for s in after.get("stages", [])],
            "events": after.get("events", [])[-3:],
        }
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests at concurrency 16 (a quarter at 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads in all, per run")
    args = parser.parse_args()
    rows = [one_run("one worker", 0, args.threads, args, None)]
    for stages in (2, 3):
        rows.append(one_run(f"{stages} stages", stages, args.threads, args, rows[0]["texts"]))
    rec = recovery(args.threads)
    print(f"recovery: {json.dumps(rec)}", flush=True)
    one = rows[0]["c16"]["output_tokens_per_s"]
    summary = {
        r["run"]: {
            "c16_throughput_vs_one_worker": r["c16"]["output_tokens_per_s"] / one if one else None,
            "transfer_s_per_hop_c16": [h["transfer_s"] for h in r["c16"].get("hops", [])],
        }
        for r in rows[1:]
    }
    result = {
        "benchmark": "pipeline",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_description(),
        "threads": args.threads,
        "rows": [{k: v for k, v in r.items() if k != "texts"} for r in rows],
        "recovery": rec,
        "summary": summary,
        "goals": {"c16_throughput_vs_one_worker_2_stages": 0.8, "transfer_s_per_hop": 0.001, "recovery_s": 10.0},
    }
    out = ROOT / "results" / "pipeline.json"
    write_json(out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
