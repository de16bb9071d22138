"""The gateway side of the HTTP benchmark: streamed chat completions over HTTP, timed per request."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from fleetserve.bench.errors import BenchError
from fleetserve.bench.http_client import HttpStreamError, StreamingClient
from fleetserve.bench.traces import StreamTrace
from fleetserve.bench.workload import WARM_UP_TEXT

if TYPE_CHECKING:
    import httpx


def import_httpx():
    """The httpx module; raise BenchError naming the install when it is missing."""
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
    """Streamed chat completions against a gateway: the timed requests on a light streaming client (bench.http_client),
    the warm-up and ``/ready`` on one shared httpx.AsyncClient."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        api_key: str | None,
        model: str,
        max_tokens: int,
        timeout_s: float = 600.0,
    ):
        self.client = client
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.streams = StreamingClient(self.url, self.headers)
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s

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
        httpx = import_httpx()
        body = {"model": self.model, "prompt": WARM_UP_TEXT, "max_tokens": 2, "temperature": 0}
        try:
            r = await self.client.post(self.url + "/v1/completions", json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise BenchError(f"warm-up request to {self.url} failed: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise BenchError(f"warm-up request to {self.url} failed: HTTP {r.status_code}: {_error_message(r.content)}")

    async def ready(self) -> dict[str, Any] | None:
        """The gateway's ``/ready`` body (None if it cannot be read)."""
        httpx = import_httpx()
        try:
            r = await self.client.get(self.url + "/ready", headers=self.headers)
            body = r.json()
        except (httpx.HTTPError, json.JSONDecodeError):
            return None
        return body if isinstance(body, dict) else None

    async def send(self, messages: list[dict], trace: StreamTrace) -> None:
        """Send one streamed chat completion and record its timings in ``trace``."""
        trace.arrival = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(messages, trace), self.timeout_s)
        except asyncio.TimeoutError:  # before OSError, of which it is a subclass from Python 3.11
            trace.fail(f"no whole response within {self.timeout_s:g} s")
        except (OSError, EOFError, asyncio.LimitOverrunError, HttpStreamError) as exc:
            trace.fail(f"{type(exc).__name__}: {exc}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            trace.fail(f"HTTP 200, bad JSON in stream: {exc}")

    async def _stream(self, messages: list[dict], trace: StreamTrace) -> None:
        usage: dict | None = None
        finish: str | None = None
        async with self.streams.post("/v1/chat/completions", self.body(messages)) as response:
            trace.status = response.status
            if response.status != 200:
                trace.fail(f"HTTP {response.status}: {_error_message(await response.read())}")
                return
            async for line in response.lines():
                now = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue  # read on to the body's end, so that the connection can be kept
                event = json.loads(data)
                if event.get("error"):
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    trace.fail(f"HTTP {response.status}, error in stream: {message}")
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

    async def close(self) -> None:
        """Close the streamed requests' idle connections."""
        await self.streams.aclose()


def healthy_workers(ready: dict | None, model: str) -> int | None:
    """The number of healthy workers for ``model`` in a ``/ready`` body (None without a body)."""
    if not ready:
        return None
    entry = (ready.get("models") or {}).get(model)
    return int(entry.get("healthy_workers", 0)) if isinstance(entry, dict) else 0
