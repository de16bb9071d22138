"""The HTTP load generator: streamed chat completions against a running gateway, and the gateway-overhead comparison.

Every request is ``POST /v1/chat/completions`` with ``stream: true`` and ``stream_options.include_usage``, greedy
(``temperature: 0``) with ``ignore_eos: true``, so each one produces exactly ``max_tokens`` tokens. One
``httpx.AsyncClient`` sends them all. Per request the client measures, with ``time.perf_counter``:

* TTFT: from just before the request is sent to the first SSE chunk that carries content;
* ITL: the gaps between consecutive content chunks (a chunk is one engine step's worth of text);
* end-to-end latency: from sending to the end of the stream;
* output tokens: ``usage.completion_tokens`` of the final usage chunk (the client does not count them);
* errors: the HTTP status and the error message of the body, a transport error, or a stream that ended without
  a finish reason or a usage chunk.

Scenarios (``--scenario``):

* ``chat``: ``benchmarks/data/prompts.jsonl``, 64 output tokens a request;
* ``shared-prefix``: ``benchmarks/data/shared_prefix.jsonl`` (one long system prompt, many questions), 32 tokens;
* ``gateway-overhead``: the ``chat`` requests sent (a) through the gateway over HTTP, as above, and (b) straight to
  ONE worker's gRPC port (``--worker HOST:PORT``): the prompts are tokenized locally, before the clock starts, with
  the worker's own tokenizer (``Worker.GetTokenizer``), and streamed with ``Worker.Generate`` over grpc.aio with the
  same sampling parameters. Both sides run at each load level in one run (the gateway first), and the report gives
  the throughput ratio gateway / direct and the TTFT p50 difference gateway - direct. The goal: the gateway costs
  at most 5% of throughput and at most 5 ms of TTFT p50. For a fair comparison the gateway must have only that one
  worker registered while this runs (otherwise the gateway side spreads its load over several engines); the run
  checks ``/ready`` and warns when the gateway reports another number of healthy workers.

Load: ``--concurrency 1,4,16`` runs a closed loop at each level in turn (c requests in flight; when one ends the
next is sent); ``--request-rate R`` runs one open loop instead, with Poisson arrivals at R requests/s (seeded by
``--seed``). Before the first level each side gets one short warm-up request (plain text, not a chat).

The server keeps a prefix cache across requests, so a later level would find the prompts of an earlier one cached
(and in ``gateway-overhead`` the direct side would find the gateway side's). Unless ``--no-salt`` is given, the
first message of every prompt therefore starts with a random four-digit tag in brackets, a different one for each
level and side: the requests of one level still share their common prefixes with each other, as on a fresh
server, but not with those of other levels, sides or (most likely) runs. The tags are in the JSON rows.

Run it as ``python benchmarks/http_bench.py`` (see ``--help``); ``run`` returns the same dict it writes as JSON.
This module owns the run as a whole and its entry points; ``http_options`` and ``scenarios`` hold the command line
and what it resolves to, ``gateway_client`` and ``worker_client`` the two sides (the gateway's streams read with
the light ``http_client``), ``load`` the loops that send, ``http_levels`` the load levels, and ``http_report`` the
rows, table and comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

from fleetserve.bench.errors import BenchError
from fleetserve.bench.gateway_client import GatewayClient, import_httpx
from fleetserve.bench.http_levels import Levels, Sides
from fleetserve.bench.http_options import add_arguments, build_parser
from fleetserve.bench.http_report import OVERHEAD_GOALS, format_table, headline
from fleetserve.bench.results import created_now, host_environment, package_version, write_json
from fleetserve.bench.scenarios import Settings, resolve
from fleetserve.bench.workload import load_prompts, salts, take

__all__ = ["BenchError", "add_arguments", "build_parser", "load_prompts", "main", "run", "run_async"]


def _settings_record(args: argparse.Namespace, settings: Settings, warmup: bool, salt: bool) -> dict[str, Any]:
    """The options of the run, as the result records them."""
    return {
        "url": args.url,
        "model": args.model,
        "worker": settings.worker,
        "prompts": str(settings.prompts),
        "requests": args.requests,
        "max_tokens": settings.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "load": "poisson" if settings.loads[0].rate is not None else "closed",
        "concurrency": [load.concurrency for load in settings.loads if load.concurrency is not None],
        "request_rate": settings.loads[0].rate,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "warmup": warmup,
        "salt": salt,
    }


def _log_report(args: argparse.Namespace, settings: Settings, result: dict, log: Callable[[str], None]) -> None:
    """The scenario line, the table of every row, the headline and where the results went."""
    log(f"{settings.scenario} scenario: {args.requests} requests x {settings.max_tokens} tokens, {args.url}")
    log(format_table(result["rows"]))
    log("")
    for line in result["headline"]:
        log(line)
    log(f"results: {settings.output}")


def _plot(args: argparse.Namespace, settings: Settings, rows: list[dict], log: Callable[[str], None]) -> None:
    """Draw the rows to ``--plot``'s file; raise BenchError when that cannot be done."""
    from fleetserve.bench.plot import plot_rows

    try:
        log(f"plot: {plot_rows(rows, args.plot, f'fleetserve HTTP benchmark, {settings.scenario} ({args.model})')}")
    except (ImportError, ValueError) as exc:
        raise BenchError(f"cannot plot the results: {exc}") from exc


async def run_async(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """``run`` on the running event loop."""
    httpx = import_httpx()
    settings = resolve(args)
    requests = take(load_prompts(settings.prompts), args.requests)
    overhead = settings.scenario == "gateway-overhead"
    salt = not getattr(args, "no_salt", False)
    warmup = not getattr(args, "no_warmup", False)
    tags = salts(len(settings.loads) * (2 if overhead else 1), salt)
    rng = random.Random(args.seed)
    worker_info: dict[str, Any] | None = None
    # httpx for the warm-up and /ready; the timed requests go through the gateway client's own light client.
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=min(args.timeout, 60.0))) as client:
        sides = Sides(GatewayClient(client, args.url, args.api_key, args.model, settings.max_tokens, args.timeout))
        try:
            if settings.worker:
                worker_info = await sides.connect_worker(settings.worker, settings.max_tokens, args.model, log)
            if warmup:
                await sides.warm_up()
            ready, healthy = await sides.check_gateway(args.model, overhead, log)
            levels = Levels(sides, requests, settings.max_tokens, rng, args.timeout, log)
            rows, comparisons = await levels.run_all(settings.loads, tags)
        finally:
            await sides.close()
    result: dict[str, Any] = {
        "benchmark": "http",
        "scenario": settings.scenario,
        "created": created_now(),
        "settings": _settings_record(args, settings, warmup, salt),
        "environment": host_environment(httpx=package_version("httpx"), grpcio=package_version("grpcio")),
        "gateway": {"ready": ready, "healthy_workers": healthy},
        "worker": worker_info,
        "goals": OVERHEAD_GOALS if overhead else None,
        "rows": rows,
        "comparisons": comparisons,
        "headline": headline(rows, comparisons),
    }
    write_json(settings.output, result)
    _log_report(args, settings, result, log)
    if getattr(args, "plot", None):
        _plot(args, settings, rows, log)
    return result


def run(args: argparse.Namespace) -> dict:
    """Run every load level of the scenario, print a table per level, write the JSON, return the result."""
    return asyncio.run(run_async(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse ``argv``, run; exit status 1 if any request failed, 2 if the run could not start."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 1 if any(row["failed"] for row in result["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
