"""Embeddings: the dynamic batcher's trade between throughput and latency, against sentence-transformers.

Inputs are the sentences of ``benchmarks/data/heldout.txt`` (mixed lengths, one input per request). Parts:

* **reference** (in this process): sentence-transformers' own ``encode`` on the inputs at batch sizes 1 to 128
  (its best is the figure to beat), and our ``Embedder`` on the same inputs at the same batch sizes, sorted by
  length as sentence-transformers sorts them;
* **low-load**: three servers side by side (batch size 1; the default batcher, 32 inputs and 5 ms, with a fixed
  and with the adaptive delay), one request at a time to each in turn: a lone request's latency, p50 and p99;
* **server**: for each max batch size (1, 8, 32) and max queue delay (0, 5, 20 ms), a real gateway and one
  embedding worker (``--threads`` torch threads); an open-loop load of one-input requests at each ``--rates``
  rate for ``--seconds``, then a closed loop of ``--saturation`` concurrent clients: inputs/s answered and the
  client's latency p50/p99 (base64 vectors, as the openai client asks for them; the load generators' light
  keep-alive HTTP client, ``fleetserve.bench.http_client``, so that they take little of the machine); and a bulk closed loop of
  ``--bulk-clients`` clients sending ``--bulk-inputs`` inputs per request (an indexing job's shape, and
  sentence-transformers' ``encode``'s: the throughput to set against it).

    python benchmarks/embeddings.py                     # everything (about 10 minutes on 2 cores)
    python benchmarks/embeddings.py --part reference
    python benchmarks/embeddings.py --batch-sizes 1 32 --delays 0 --rates 5 50

Writes ``benchmarks/results/embeddings.json`` and the chart ``docs/img/embeddings-batching.png``.
sentence-transformers is not a dependency: ``pip install sentence-transformers`` for its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

from fleetserve.bench.http_client import HttpStreamError, StreamingClient
from fleetserve.bench.local_fleet import Fleet
from fleetserve.bench.results import cpu_description, created_now, host_environment, package_version, write_json

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "embeddings.json"
CHART = ROOT.parent / "docs" / "img" / "embeddings-batching.png"
MODEL = "all-minilm-l6-v2"
REFERENCE_BATCHES = (1, 8, 16, 32, 64, 128)


def sentences() -> list[str]:
    """The held-out text's sentences (and headings), in order."""
    text = (ROOT / "data" / "heldout.txt").read_text()
    parts = [p.strip() for line in text.splitlines() for p in re.split(r"(?<=[.!?])\s+", line)]
    return [p for p in parts if p]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def reference(texts: list[str], threads: int) -> dict:
    """Inputs/s of sentence-transformers' encode and of our Embedder, per batch size, on the same inputs."""
    import torch

    from fleetserve.engine.embedder import Embedder
    from fleetserve.model_files import prepare_model_dir
    from fleetserve.text.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    model_dir = prepare_model_dir(MODEL, progress=False)
    ours, tok = Embedder.load(model_dir), Tokenizer.from_dir(model_dir)
    ids = sorted(tok.encode_inputs(texts), key=len)  # sentence-transformers sorts by length too
    rows: dict = {"inputs": len(texts), "tokens": sum(map(len, ids)), "fleetserve": {}, "sentence_transformers": {}}

    def timed(run) -> float:
        """Inputs/s of the best of three runs after a warm one (this machine's neighbours come and go)."""
        run()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
        return round(len(texts) / best, 1)

    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(model_dir), device="cpu")
        rows["sentence_transformers_version"] = package_version("sentence-transformers")
    except ImportError:
        st = None
        rows["sentence_transformers"] = "not installed (pip install sentence-transformers)"
    for size in REFERENCE_BATCHES:  # side by side, batch size by batch size
        rows["fleetserve"][size] = timed(lambda s=size: [ours.embed(ids[i : i + s]) for i in range(0, len(ids), s)])
        if st is not None:
            rows["sentence_transformers"][size] = timed(lambda s=size: st.encode(texts, batch_size=s))
    return rows


async def _post(client: StreamingClient, text: str | list[str]) -> float:
    """Seconds until the whole answer was read; RuntimeError on a status other than 200."""
    started = time.perf_counter()
    body = {"model": MODEL, "input": text, "encoding_format": "base64"}
    async with client.post("/v1/embeddings", body) as response:
        await response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - started


FAILURES = (OSError, EOFError, RuntimeError, HttpStreamError)
"""What one request can fail with: counted, and the connection is not used again."""


def _summary(latencies: list[float], took: float, offered: float | None, errors: int) -> dict:
    return {
        "offered_per_s": offered,
        "answered": len(latencies),
        "inputs_per_s": round(len(latencies) / took, 1),
        "errors": errors,
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 2) if latencies else 0.0,
    }


async def open_loop(url: str, texts: list[str], rate: float, seconds: float) -> dict:
    """One-input requests at ``rate`` a second, whatever the answers do (a free connection each, opened when none
    is free)."""
    latencies: list[float] = []
    errors = 0
    client = StreamingClient(url)

    async def one(text: str) -> None:
        nonlocal errors
        try:
            latencies.append(await _post(client, text))
        except FAILURES:
            errors += 1

    tasks = []
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(texts[i % len(texts)])))
    await asyncio.gather(*tasks)
    took = time.perf_counter() - started
    await client.aclose()
    return _summary(latencies, took, rate, errors)


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float, per_request: int = 1) -> dict:
    """``clients`` callers, each sending its next request (of ``per_request`` inputs) when the last is answered:
    the server's saturation. Latencies are per request; throughput counts inputs."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal errors
        client = StreamingClient(url)  # one connection each, kept alive (a new one after a failure)
        i = k * per_request
        try:
            while time.perf_counter() < deadline:
                chunk = [texts[(i + j) % len(texts)] for j in range(per_request)]
                try:
                    latencies.append(await _post(client, chunk[0] if per_request == 1 else chunk))
                except FAILURES:
                    errors += 1
                i += clients * per_request
        finally:
            await client.aclose()

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(clients)))
    took = time.perf_counter() - started
    summary = _summary(latencies, took, None, errors)
    summary["inputs_per_s"] = round(len(latencies) * per_request / took, 1)
    return summary | {"clients": clients, "inputs_per_request": per_request}


def server_settings(args: argparse.Namespace) -> list[tuple[int, float, bool]]:
    """(max batch size, max delay ms, adaptive) of each server: the grid with fixed delays, then the largest
    batch size with the adaptive delay (the default) at each delay above 0."""
    grid = [(size, delay, False) for size in args.batch_sizes for delay in args.delays]
    if args.adaptive:
        grid += [(max(args.batch_sizes), delay, True) for delay in args.delays if delay > 0]
    return grid


def server(texts: list[str], args: argparse.Namespace) -> list[dict]:
    rows = []
    for size, delay, adaptive in server_settings(args):
        worker = ("--model", MODEL, "--max-batch-size", str(size), "--max-queue-delay-ms", str(delay))
        worker += ("--adaptive-queue-delay",) if adaptive else ("--no-adaptive-queue-delay",)
        fleet = Fleet(1, args.threads, worker_args=worker)
        try:
            asyncio.run(closed_loop(fleet.url, texts, 4, 2.0))  # warm: connections, the model's first runs
            levels = [asyncio.run(open_loop(fleet.url, texts, rate, args.seconds)) for rate in args.rates]
            levels.append(asyncio.run(closed_loop(fleet.url, texts, args.saturation, args.seconds)))
            bulk = asyncio.run(closed_loop(fleet.url, texts, args.bulk_clients, args.seconds, args.bulk_inputs))
        finally:
            fleet.close()
        row = {"max_batch_size": size, "max_queue_delay_ms": delay, "adaptive": adaptive, "levels": levels}
        row["bulk"] = bulk
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


LOW_LOAD = ((1, 0.0, False), (32, 5.0, False), (32, 5.0, True))
"""The servers of the low-load comparison: batch size 1, and the default batcher with a fixed and an adaptive delay."""


async def _low_load(urls: list[str], texts: list[str], requests: int, gap_s: float) -> list[list[float]]:
    latencies: list[list[float]] = [[] for _ in urls]
    clients = [StreamingClient(url) for url in urls]
    try:
        for i in range(requests):
            for k, client in enumerate(clients):  # in turn: every server sees the same moments of the machine
                await asyncio.sleep(gap_s)
                latencies[k].append(await _post(client, texts[i % len(texts)]))
    finally:
        for client in clients:
            await client.aclose()
    return latencies


def low_load(texts: list[str], args: argparse.Namespace) -> list[dict]:
    """One request at a time to each of the LOW_LOAD servers in turn (all running side by side), ``--low-gap``
    seconds apart: what a lone request costs with each batcher setting."""
    fleets = []
    try:
        for size, delay, adaptive in LOW_LOAD:
            worker = ("--model", MODEL, "--max-batch-size", str(size), "--max-queue-delay-ms", str(delay))
            worker += ("--adaptive-queue-delay",) if adaptive else ("--no-adaptive-queue-delay",)
            fleets.append(Fleet(1, args.threads, worker_args=worker))
        urls = [f.url for f in fleets]
        asyncio.run(_low_load(urls, texts, 10, args.low_gap))  # warm
        measured = asyncio.run(_low_load(urls, texts, args.low_requests, args.low_gap))
    finally:
        for fleet in fleets:
            fleet.close()
    rows = []
    for (size, delay, adaptive), latencies in zip(LOW_LOAD, measured):
        rows.append(
            {"max_batch_size": size, "max_queue_delay_ms": delay, "adaptive": adaptive}
            | {
                "p50_ms": round(percentile(latencies, 0.5) * 1e3, 2),
                "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2),
            }
        )
    print(json.dumps(rows), flush=True)
    return rows


def chart(rows: list[dict], path: Path) -> None:
    """p50 latency against inputs/s answered, one line per batcher setting: colour by batch size, line style by
    delay. Open-loop levels the server could not keep up with (under 90% answered in time) are left out; the
    last point of each line is the closed loop's saturation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {1: "tab:red", 8: "tab:blue", 32: "tab:green"}
    styles = {0.0: "-", 5.0: "--", 20.0: ":"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        levels = [
            x for x in row["levels"] if x["offered_per_s"] is None or x["inputs_per_s"] >= 0.9 * x["offered_per_s"]
        ]
        label = f"batch {row['max_batch_size']}, delay {row['max_queue_delay_ms']:g} ms"
        label += " (adaptive)" if row["adaptive"] else ""
        ax.plot(
            [x["inputs_per_s"] for x in levels],
            [x["p50_ms"] for x in levels],
            color=colours.get(row["max_batch_size"], "tab:gray"),
            linestyle=styles.get(float(row["max_queue_delay_ms"]), "-."),
            marker="s" if row["adaptive"] else "o",
            label=label,
        )
    ax.set_xlabel("inputs answered per second (one input per request)")
    ax.set_ylabel("latency p50 (ms)")
    ax.set_yscale("log")
    ax.set_title("Embeddings: the batcher's trade between throughput and latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "reference", "low-load", "server", "chart"), default="all")
    parser.add_argument("--low-requests", type=int, default=150, help="requests to each server at low load")
    parser.add_argument("--low-gap", type=float, default=0.1, help="seconds between low-load requests")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the reference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 5, 20], help="max queue delays in ms")
    parser.add_argument(
        "--adaptive", action=argparse.BooleanOptionalAction, default=True,
        help="also measure the largest batch size with the adaptive delay",
    )  # fmt: skip
    parser.add_argument("--rates", type=float, nargs="+", default=[5, 25, 50, 100, 150], help="requests/s offered")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per load level")
    parser.add_argument("--saturation", type=int, default=64, help="concurrent clients of the closed loop")
    parser.add_argument("--bulk-inputs", type=int, default=32, help="inputs per request of the bulk closed loop")
    parser.add_argument("--bulk-clients", type=int, default=4, help="concurrent clients of the bulk closed loop")
    args = parser.parse_args(argv)
    if args.part == "chart":  # redraw from the result file
        chart(json.loads(RESULTS.read_text())["server"], CHART)
        return 0
    texts = sentences()
    result: dict = {
        "benchmark": "embeddings",
        "created": created_now(),
        "cpu": cpu_description(),
        "host": host_environment(torch=package_version("torch")),
        "model": MODEL,
        "settings": vars(args),
    }
    if args.part in ("all", "reference"):
        result["reference"] = reference(texts * 4, args.threads)  # the text four times: a longer measurement
        print(json.dumps(result["reference"]), flush=True)
    if args.part in ("all", "low-load"):
        result["low_load"] = low_load(texts, args)
    if args.part in ("all", "server"):
        result["server"] = server(texts, args)
        chart(result["server"], CHART)
    write_json(RESULTS, result)
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
