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

Run it as ``python benchmarks/http.py`` (see ``--help``); ``run`` returns the same dict it writes as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetserve.bench.engine_bench import (
    DEFAULT_MODEL,
    REPO_ROOT,
    RequestTrace,
    _concurrency_list,
    _ms,
    _positive_int,
    _s,
    _take,
    load_prompts,
    summarize,
)
from fleetserve.errors import FleetServeError

if TYPE_CHECKING:
    import httpx

    from fleetserve.protocol import fleet_pb2 as pb
    from fleetserve.text.tokenizer import Tokenizer

DATA_DIR = REPO_ROOT / "benchmarks" / "data"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Scenario:
    """A scenario's prompts file and its defaults."""

    prompts: Path
    max_tokens: int
    concurrency: tuple[int, ...]
    description: str


SCENARIOS: dict[str, Scenario] = {
    "chat": Scenario(DATA_DIR / "prompts.jsonl", 64, (1, 4, 16), "64 chat prompts"),
    "shared-prefix": Scenario(
        DATA_DIR / "shared_prefix.jsonl", 32, (1, 4, 16), "questions after one long shared system prompt"
    ),
    "gateway-overhead": Scenario(
        DATA_DIR / "prompts.jsonl", 64, (16,), "the chat prompts through the gateway and straight to one worker"
    ),
}

OVERHEAD_GOALS: dict[str, float] = {"max_throughput_loss": 0.05, "max_ttft_p50_increase_s": 0.005}
"""gateway-overhead: the gateway may cost at most 5% of the direct throughput and 5 ms of TTFT p50."""

WARM_UP_TEXT = "Hello! How are you today?"
"""Plain text (not a chat), so that warming up leaves no chat-template prefix in the prefix cache."""

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]


class BenchError(FleetServeError):
    """The benchmark cannot run as asked (bad options, a server that refuses the warm-up, a missing package)."""


# -- traces -----------------------------------------------------------------------------------------------


@dataclass
class StreamTrace(RequestTrace):
    """A RequestTrace (times in ``time.perf_counter`` seconds) plus what the server said about the prompt."""

    cached_tokens: int = 0
    status: int | None = None
    """The HTTP status (None for gRPC or when no response came)."""

    def fail(self, message: str) -> None:
        """Mark the request failed with ``message`` (kept short)."""
        self.error = message[:300]
        self.finish_reason = "error"
        if self.finish_time is None:
            self.finish_time = time.perf_counter()


Send = Callable[[int, StreamTrace], Awaitable[None]]
"""Sends request number i and fills its trace; must not raise for a failed request."""


# -- load drivers -----------------------------------------------------------------------------------------


async def _guarded(send: Send, index: int, trace: StreamTrace) -> None:
    try:
        await send(index, trace)
    except Exception as exc:  # a load generator records any failure of one request and goes on with the others
        trace.fail(f"{type(exc).__name__}: {exc}")


async def closed_loop(send: Send, traces: Sequence[StreamTrace], concurrency: int) -> float:
    """Send every trace's request keeping ``concurrency`` in flight; return the wall time in seconds."""
    pending = iter(range(len(traces)))

    async def lane() -> None:
        for index in pending:  # one shared iterator: each lane takes the next request when it is free
            await _guarded(send, index, traces[index])

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(traces)))))
    return time.perf_counter() - start


async def open_loop(send: Send, traces: Sequence[StreamTrace], rate: float, rng: random.Random) -> float:
    """Send the requests at Poisson arrivals of ``rate`` per second (the first at once); return the wall time."""
    start = time.perf_counter()
    due = 0.0
    tasks = []
    for index, trace in enumerate(traces):
        if index:
            due += rng.expovariate(rate)
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_guarded(send, index, trace)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


# -- the gateway over HTTP --------------------------------------------------------------------------------


def _import_httpx():
    try:
        import httpx
    except ImportError as exc:
        raise BenchError("the HTTP benchmark needs httpx: pip install httpx") from exc
    return httpx


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI error body, else the start of the body."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return json.dumps(body)[:200]


class GatewayClient:
    """Streamed chat completions against a gateway, on one shared httpx.AsyncClient."""

    def __init__(self, client: httpx.AsyncClient, url: str, api_key: str | None, model: str, max_tokens: int):
        self.client = client
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.max_tokens = max_tokens

    def body(self, messages: list[dict]) -> dict[str, Any]:
        """The request body of one benchmark request."""
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def warm_up(self) -> None:
        """One short plain-text completion; raise BenchError if the gateway refuses it."""
        httpx = _import_httpx()
        body = {"model": self.model, "prompt": WARM_UP_TEXT, "max_tokens": 2, "temperature": 0}
        try:
            r = await self.client.post(self.url + "/v1/completions", json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise BenchError(f"warm-up request to {self.url} failed: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise BenchError(f"warm-up request to {self.url} failed: HTTP {r.status_code}: {_error_message(r.content)}")

    async def ready(self) -> dict[str, Any] | None:
        """The gateway's ``/ready`` body (None if it cannot be read)."""
        httpx = _import_httpx()
        try:
            r = await self.client.get(self.url + "/ready", headers=self.headers)
            body = r.json()
        except (httpx.HTTPError, json.JSONDecodeError):
            return None
        return body if isinstance(body, dict) else None

    async def send(self, messages: list[dict], trace: StreamTrace) -> None:
        """Send one streamed chat completion and record its timings in ``trace``."""
        httpx = _import_httpx()
        usage: dict | None = None
        finish: str | None = None
        trace.arrival = time.perf_counter()
        try:
            async with self.client.stream(
                "POST", self.url + "/v1/chat/completions", json=self.body(messages), headers=self.headers
            ) as response:
                trace.status = response.status_code
                if response.status_code != 200:
                    trace.fail(f"HTTP {response.status_code}: {_error_message(await response.aread())}")
                    return
                async for line in response.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        error = event["error"]
                        message = error.get("message") if isinstance(error, dict) else error
                        trace.fail(f"HTTP {response.status_code}, error in stream: {message}")
                        return
                    content = False
                    for choice in event.get("choices") or ():
                        content = content or bool((choice.get("delta") or {}).get("content"))
                        finish = choice.get("finish_reason") or finish
                    if content:
                        if trace.first_token is None:
                            trace.first_token = now
                        trace.token_times.append(now)
                    if event.get("usage"):
                        usage = event["usage"]
        except httpx.HTTPError as exc:
            trace.fail(f"{type(exc).__name__}: {exc}")
            return
        except json.JSONDecodeError as exc:
            trace.fail(f"HTTP 200, bad JSON in stream: {exc}")
            return
        trace.finish_time = time.perf_counter()
        if finish is None:
            trace.fail("HTTP 200, but the stream ended without a finish_reason")
        elif usage is None:
            trace.fail("HTTP 200, but the stream ended without a usage chunk")
        else:
            trace.output_tokens = int(usage.get("completion_tokens") or 0)
            trace.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            trace.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            trace.finish_reason = finish


# -- one worker over gRPC ---------------------------------------------------------------------------------


class WorkerClient:
    """Token ids straight to one worker's Worker service over grpc.aio, tokenized here with its own tokenizer."""

    def __init__(self, address: str, max_tokens: int):
        import grpc

        from fleetserve.contract import SamplingParams
        from fleetserve.protocol import convert
        from fleetserve.protocol import fleet_pb2_grpc as pb_grpc

        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.WorkerStub(self.channel)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True).validate()
        self.params = convert.sampling_to_proto(params)
        self.model = ""
        self.fingerprint = ""
        self._run = uuid.uuid4().hex[:12]

    async def close(self) -> None:
        """Close the gRPC channel."""
        await self.channel.close()

    async def fetch_tokenizer(self) -> Tokenizer:
        """The worker's tokenizer: its files from GetTokenizer, written to a temporary folder and loaded."""
        import grpc

        from fleetserve.protocol import fleet_pb2 as pb
        from fleetserve.text.tokenizer import Tokenizer

        try:
            files = await self.stub.GetTokenizer(pb.TokenizerRequest(), timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(
                f"GetTokenizer on worker {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        self.model, self.fingerprint = files.model, files.fingerprint
        with tempfile.TemporaryDirectory(prefix="fleetserve-bench-tokenizer-") as folder:
            for name, data in files.files.items():
                if "/" in name or "\\" in name or name.startswith("."):
                    raise BenchError(f"worker {self.address} sent a tokenizer file with a bad name: {name!r}")
                (Path(folder) / name).write_bytes(data)
            return Tokenizer.from_dir(folder)  # reads every file now: the folder can go

    def _request(self, request_id: str, prompt: list[int], params: pb.SamplingParams | None = None):
        """A GenerateRequest, with the benchmark's sampling parameters unless told otherwise."""
        from fleetserve.protocol import fleet_pb2 as pb

        return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params or self.params)

    async def warm_up(self, tokenizer: Tokenizer) -> None:
        """One short plain-text generation; raise BenchError if the worker refuses it."""
        import grpc

        from fleetserve.contract import SamplingParams
        from fleetserve.protocol import convert

        params = convert.sampling_to_proto(SamplingParams(max_tokens=2))
        request = self._request(f"bench-{self._run}-warm-up", tokenizer.encode(WARM_UP_TEXT), params)
        try:
            async for _ in self.stub.Generate(request, timeout=120):
                pass
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"warm-up on worker {self.address} failed: {exc.code().name}: {exc.details()}") from exc

    async def stats(self) -> dict[str, int] | None:
        """The worker's counters (None if Stats fails)."""
        import grpc

        from fleetserve.protocol import fleet_pb2 as pb

        try:
            s = await self.stub.Stats(pb.StatsRequest(), timeout=30)
        except grpc.aio.AioRpcError:
            return None
        return {
            "steps": s.steps,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
        }

    async def send(self, prompt: list[int], trace: StreamTrace, timeout: float) -> None:
        """Stream one Generate call and record its timings in ``trace``."""
        import grpc

        request = self._request(f"bench-{self._run}-{trace.request_id}", prompt)
        finish = ""
        trace.prompt_tokens = len(prompt)
        trace.arrival = time.perf_counter()
        call = self.stub.Generate(request, timeout=timeout)
        try:
            async for chunk in call:
                now = time.perf_counter()
                if chunk.token_ids:
                    if trace.first_token is None:
                        trace.first_token = now
                    trace.token_times.append(now)
                trace.output_tokens = chunk.num_output_tokens
                trace.prompt_tokens = chunk.num_prompt_tokens or trace.prompt_tokens
                trace.cached_tokens = chunk.num_cached_tokens
                finish = chunk.finish_reason or finish
        except grpc.aio.AioRpcError as exc:
            trace.fail(f"gRPC {exc.code().name}: {exc.details()}")
            return
        finally:
            call.cancel()  # no-op once the call is done
        trace.finish_time = time.perf_counter()
        if finish in ("stop", "length"):
            trace.finish_reason = finish
        else:
            trace.fail(f"gRPC OK, but the stream ended with finish_reason {finish!r}")


# -- rows -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One load level: a closed loop at ``concurrency`` or an open loop at ``rate`` requests/s."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        """``c=4`` or ``rate=2.5/s``, as in the row names."""
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"

    async def drive(self, send: Send, traces: Sequence[StreamTrace], rng: random.Random) -> float:
        """Send every trace's request under this load; return the wall time in seconds."""
        if self.concurrency is not None:
            return await closed_loop(send, traces, self.concurrency)
        assert self.rate is not None
        return await open_loop(send, traces, self.rate, rng)


def salted(messages: list[dict], tag: str | None) -> list[dict]:
    """``messages`` with ``[tag] `` in front of the first message's text (unchanged when tag is None)."""
    if tag is None or not messages or not isinstance(messages[0].get("content"), str):
        return messages
    first = dict(messages[0])
    first["content"] = f"[{tag}] {first['content']}"
    return [first, *messages[1:]]


def make_row(name: str, kind: str, load: Load, traces: Sequence[StreamTrace], wall_s: float, max_tokens: int) -> dict:
    """engine_bench.summarize's figures plus the load, cached prompt tokens, short answers and error counts."""
    row: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "load": "closed" if load.concurrency is not None else "poisson",
        "concurrency": load.concurrency,
        "request_rate": load.rate,
    }
    row.update(summarize(traces, wall_s))
    cached = sum(t.cached_tokens for t in traces)
    row["cached_tokens"] = cached
    row["prefix_cache_hit_rate"] = cached / row["prompt_tokens"] if row["prompt_tokens"] else 0.0
    row["short_requests"] = sum(1 for t in traces if t.completed and t.output_tokens < max_tokens)
    row["error_counts"] = dict(
        Counter(t.error or f"finish_reason={t.finish_reason}" for t in traces if not t.completed)
    )
    return row


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table in engine_bench's style (TTFT and ITL in ms, end-to-end in s)."""
    header = (
        "scenario",
        "done",
        "fail",
        "out tok",
        "wall s",
        "tok/s",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p99 ms",
        "E2E p50/p99 s",
        "cached",
    )
    table = [header]
    for row in rows:
        ttft, itl, e2e = row["ttft_s"], row["itl_s"], row["e2e_s"]
        table.append(
            (
                row["name"],
                str(row["completed"]),
                str(row["failed"]),
                str(row["output_tokens"]),
                f"{row['wall_s']:.2f}",
                f"{row['output_tokens_per_s']:.1f}",
                "/".join(_ms(ttft[p]) for p in ("p50", "p90", "p99")),
                "/".join(_ms(itl[p]) for p in ("p50", "p99")),
                "/".join(_s(e2e[p]) for p in ("p50", "p99")),
                _pct(row["prefix_cache_hit_rate"]),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for n, line in enumerate(table):
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(gateway: dict, direct: dict) -> dict[str, Any]:
    """The gateway-overhead figures of one load level: throughput ratio and TTFT p50 difference, against the goals."""
    g_tps, d_tps = gateway["output_tokens_per_s"], direct["output_tokens_per_s"]
    g_ttft, d_ttft = gateway["ttft_s"]["p50"], direct["ttft_s"]["p50"]
    ratio = g_tps / d_tps if d_tps > 0 else None
    diff = g_ttft - d_ttft if g_ttft is not None and d_ttft is not None else None
    return {
        "load": gateway["name"].split(" ", 1)[1],
        "gateway_output_tokens_per_s": g_tps,
        "direct_output_tokens_per_s": d_tps,
        "throughput_ratio": ratio,
        "throughput_loss": None if ratio is None else 1 - ratio,
        "ttft_p50_gateway_s": g_ttft,
        "ttft_p50_direct_s": d_ttft,
        "ttft_p50_diff_s": diff,
        "meets_throughput_goal": None if ratio is None else 1 - ratio <= OVERHEAD_GOALS["max_throughput_loss"],
        "meets_ttft_goal": None if diff is None else diff <= OVERHEAD_GOALS["max_ttft_p50_increase_s"],
    }


def _comparison_line(c: dict) -> str:
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    ratio = "-" if c["throughput_ratio"] is None else f"{c['throughput_ratio']:.3f}"
    diff = "-" if c["ttft_p50_diff_s"] is None else f"{c['ttft_p50_diff_s'] * 1000:+.1f} ms"
    return (
        f"gateway-overhead {c['load']}: throughput gateway/direct = {ratio} "
        f"(goal >= {1 - OVERHEAD_GOALS['max_throughput_loss']:.2f}: {verdict(c['meets_throughput_goal'])}), "
        f"TTFT p50 gateway - direct = {diff} "
        f"(goal <= {OVERHEAD_GOALS['max_ttft_p50_increase_s'] * 1000:g} ms: {verdict(c['meets_ttft_goal'])})"
    )


# -- options ----------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP benchmark's options to ``parser``."""
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway's base URL (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="bearer key for the gateway (default: none)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name to ask for (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="chat",
        help="chat: prompts.jsonl, 64 tokens; shared-prefix: shared_prefix.jsonl, 32 tokens; gateway-overhead: the "
        "chat requests through the gateway and straight to --worker over gRPC, at concurrency 16 unless told "
        "(the gateway must have only that one worker registered, for a fair comparison) (default chat)",
    )
    parser.add_argument(
        "--worker",
        type=_host_port,
        default=None,
        help="gateway-overhead: HOST:PORT of the worker's gRPC service, the only worker registered with the gateway",
    )
    parser.add_argument("--prompts", type=Path, default=None, help="JSONL prompts file (default: the scenario's)")
    parser.add_argument(
        "--max-tokens", type=_positive_int, default=None, help="output tokens per request (default: the scenario's)"
    )
    parser.add_argument(
        "--requests", type=_positive_int, default=64, help="requests per level, cycling the prompts (default 64)"
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=None,
        help="comma-separated closed-loop concurrencies, run in turn (default 1,4,16; gateway-overhead: 16)",
    )
    load.add_argument(
        "--request-rate",
        type=_positive_float,
        default=None,
        help="open loop instead: Poisson arrivals at this many requests/s",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default 0)")
    parser.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds one request may take (default 600)"
    )
    parser.add_argument("--no-warmup", action="store_true", help="send no warm-up request before the first level")
    parser.add_argument(
        "--no-salt",
        action="store_true",
        help="send the prompts unchanged (by default each level and side tags its prompts so that none finds "
        "another's in the prefix cache)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON result file (default benchmarks/results/http-<scenario>.json)"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="also draw latency and throughput per load level to this PNG"
    )


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``benchmarks/http.py``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/http.py",
        description="fleetserve HTTP load generator: streamed chat completions against a gateway. "
        "--scenario gateway-overhead also sends the same requests straight to one worker over gRPC (--worker); "
        "the gateway must have only that worker registered while it runs.",
    )
    add_arguments(parser)
    return parser


@dataclass
class Settings:
    """The options after the scenario's defaults are filled in."""

    scenario: str
    prompts: Path
    max_tokens: int
    loads: list[Load]
    output: Path
    worker: str | None


def resolve(args: argparse.Namespace) -> Settings:
    """Fill in the scenario's defaults; raise BenchError on options that do not fit together."""
    scenario = SCENARIOS[args.scenario]
    worker = getattr(args, "worker", None)
    if args.scenario == "gateway-overhead" and not worker:
        raise BenchError("--scenario gateway-overhead needs --worker HOST:PORT (the gateway's only worker)")
    if args.scenario != "gateway-overhead" and worker:
        raise BenchError("--worker is only used by --scenario gateway-overhead")
    rate = getattr(args, "request_rate", None)
    concurrency = getattr(args, "concurrency", None)
    if rate is not None and concurrency is not None:
        raise BenchError("--concurrency and --request-rate exclude each other")
    if rate is not None:
        loads = [Load(rate=rate)]
    else:
        loads = [Load(concurrency=c) for c in (concurrency or scenario.concurrency)]
    output = getattr(args, "output", None) or RESULTS_DIR / f"http-{args.scenario}.json"
    return Settings(
        scenario=args.scenario,
        prompts=Path(getattr(args, "prompts", None) or scenario.prompts),
        max_tokens=getattr(args, "max_tokens", None) or scenario.max_tokens,
        loads=loads,
        output=Path(output),
        worker=worker,
    )


def _environment() -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "httpx": pkg("httpx"),
        "grpcio": pkg("grpcio"),
    }


def _healthy_workers(ready: dict | None, model: str) -> int | None:
    if not ready:
        return None
    entry = (ready.get("models") or {}).get(model)
    return int(entry.get("healthy_workers", 0)) if isinstance(entry, dict) else 0


# -- entry points -----------------------------------------------------------------------------------------


@dataclass
class _Sides:
    """What one run sends with: the gateway client and, for gateway-overhead, the worker client and tokenizer."""

    gateway: GatewayClient
    direct: WorkerClient | None = None
    tokenizer: Tokenizer | None = None


async def _run_level(
    load: Load,
    sides: _Sides,
    requests: list[list[dict]],
    settings: Settings,
    salts: list[str | None],
    rng: random.Random,
    timeout: float,
    log: Callable[[str], None],
) -> list[dict]:
    """One load level: the gateway row, then (gateway-overhead) the direct row; ``salts`` gives one tag a side."""
    direct, tokenizer = sides.direct, sides.tokenizer
    log(f"http {load.label}: {len(requests)} requests x {settings.max_tokens} tokens ...")
    salt = salts.pop()
    payloads = [salted(m, salt) for m in requests]
    traces = [StreamTrace(f"http-{load.label}-{i}", 0) for i in range(len(requests))]

    async def send_http(i: int, trace: StreamTrace) -> None:
        await sides.gateway.send(payloads[i], trace)

    before = await direct.stats() if direct else None
    wall = await load.drive(send_http, traces, rng)
    rows = [make_row(f"http {load.label}", "http", load, traces, wall, settings.max_tokens)]
    rows[0]["salt"] = salt
    if direct is None or tokenizer is None:
        return rows
    rows[0]["worker_stats"] = _delta(before, await direct.stats())

    log(f"grpc {load.label}: {len(requests)} requests x {settings.max_tokens} tokens ...")
    salt = salts.pop()
    ids = [tokenizer.encode_chat(salted(m, salt)) for m in requests]  # before the clock: the worker alone is timed
    traces = [StreamTrace(f"grpc-{load.label}-{i}", len(p)) for i, p in enumerate(ids)]

    async def send_grpc(i: int, trace: StreamTrace) -> None:
        await direct.send(ids[i], trace, timeout)

    before = await direct.stats()
    wall = await load.drive(send_grpc, traces, rng)
    rows.append(make_row(f"grpc {load.label}", "grpc", load, traces, wall, settings.max_tokens))
    rows[1]["salt"] = salt
    rows[1]["worker_stats"] = _delta(before, await direct.stats())
    return rows


def _salts(count: int, enabled: bool) -> list[str | None]:
    """``count`` distinct random 4-digit tags (short, so they add few prompt tokens), or Nones when disabled."""
    if not enabled:
        return [None] * count
    return [str(n) for n in secrets.SystemRandom().sample(range(1000, 10000), count)]


async def run_async(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """``run`` on the running event loop."""
    httpx = _import_httpx()
    settings = resolve(args)
    requests = _take(load_prompts(settings.prompts), args.requests)
    overhead = settings.scenario == "gateway-overhead"
    salt = not getattr(args, "no_salt", False)
    warmup = not getattr(args, "no_warmup", False)
    salts = _salts(len(settings.loads) * (2 if overhead else 1), salt)
    rng = random.Random(args.seed)
    most = max(load.concurrency or 0 for load in settings.loads)  # 0: open loop, any number in flight
    limits = httpx.Limits(max_connections=most + 4 if most else None, max_keepalive_connections=max(most, 16) + 4)
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 60.0))
    rows: list[dict] = []
    comparisons: list[dict] = []
    worker_info: dict[str, Any] | None = None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        sides = _Sides(GatewayClient(client, args.url, args.api_key, args.model, settings.max_tokens))
        try:
            if settings.worker:
                sides.direct = WorkerClient(settings.worker, settings.max_tokens)
                sides.tokenizer = await sides.direct.fetch_tokenizer()
                worker_info = {"address": settings.worker, "model": sides.direct.model}
                worker_info["tokenizer_fingerprint"] = sides.direct.fingerprint
                if sides.direct.model != args.model:
                    log(f"warning: worker {settings.worker} serves {sides.direct.model!r}, not {args.model!r}")
            if warmup:
                await sides.gateway.warm_up()
                if sides.direct is not None and sides.tokenizer is not None:
                    await sides.direct.warm_up(sides.tokenizer)
            ready = await sides.gateway.ready()
            healthy = _healthy_workers(ready, args.model)
            if overhead and healthy != 1:
                log(
                    f"warning: the gateway reports {healthy} healthy workers for {args.model}; the gateway-overhead "
                    "comparison is fair only with --worker as its one worker"
                )
            for load in settings.loads:
                level = await _run_level(load, sides, requests, settings, salts, rng, args.timeout, log)
                rows += level
                log(format_table(level))
                if len(level) == 2:
                    comparisons.append(compare(level[0], level[1]))
                    log(_comparison_line(comparisons[-1]))
                log("")
        finally:
            if sides.direct is not None:
                await sides.direct.close()
    headline = [
        f"{row['name']}: {row['output_tokens_per_s']:.1f} tok/s, {row['completed']}/{row['requests']} completed"
        + (f", {row['short_requests']} short of max_tokens" if row["short_requests"] else "")
        for row in rows
    ]
    headline += [_comparison_line(c) for c in comparisons]
    result: dict[str, Any] = {
        "benchmark": "http",
        "scenario": settings.scenario,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
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
        },
        "environment": _environment(),
        "gateway": {"ready": ready, "healthy_workers": healthy},
        "worker": worker_info,
        "goals": OVERHEAD_GOALS if overhead else None,
        "rows": rows,
        "comparisons": comparisons,
        "headline": headline,
    }
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"{settings.scenario} scenario: {args.requests} requests x {settings.max_tokens} tokens, {args.url}")
    log(format_table(rows))
    log("")
    for line in headline:
        log(line)
    log(f"results: {settings.output}")
    if getattr(args, "plot", None):
        from fleetserve.bench.plot import plot_rows

        try:
            log(f"plot: {plot_rows(rows, args.plot, f'fleetserve HTTP benchmark, {settings.scenario} ({args.model})')}")
        except (ImportError, ValueError) as exc:
            raise BenchError(f"cannot plot the results: {exc}") from exc
    return result


def _delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, Any] | None:
    """The worker's counters over one side's run, and its prefix cache hit rate."""
    if before is None or after is None:
        return None
    delta: dict[str, Any] = {key: after[key] - before[key] for key in after}
    queries = delta["prefix_cache_queries"]
    delta["prefix_cache_hit_rate"] = delta["prefix_cache_hits"] / queries if queries else 0.0
    return delta


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
