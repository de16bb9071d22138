"""Chat requests to a fleet's gateway over real HTTP: bodies, whole answers, streams that report their progress."""

from __future__ import annotations

import asyncio
import json

import httpx

MODEL = "smollm2-135m-instruct"


def chat_body(prompt: str, seed: int | None = None, max_tokens: int = 16, **extra) -> dict:
    """A chat body for the default model: greedy, or sampled at temperature 0.8 with ``seed``."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **extra}
    return {**body, "temperature": 0.8, "seed": seed} if seed is not None else {**body, "temperature": 0}


async def answer(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    resp = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp


async def stream_text(client: httpx.AsyncClient, url: str, body: dict, progress: list) -> str:
    """The streamed answer's text; ``progress`` gets the request id, then a 1 per event."""
    text = ""
    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        progress.append(resp.headers["x-request-id"])
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["delta"].get("content") or ""
                progress.append(1)
    return text


def complete(url: str, bodies: list[dict]) -> list[str]:
    """Every body's answer text, the requests sent at once."""

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            answers = await asyncio.gather(*(answer(client, url, b) for b in bodies))
            return [a.json()["choices"][0]["message"]["content"] for a in answers]

    return asyncio.run(run())


def trace(url: str, request_id: str) -> dict:
    return httpx.get(f"{url}/v1/requests/{request_id}/trace", timeout=10).json()
