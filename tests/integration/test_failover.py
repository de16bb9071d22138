"""Failure handling with real processes: stopped heartbeats, overload, slow clients, and the registry kept across a
gateway restart (kill -9 mid-stream, with token-exact failover, is in test_node_agent, where the node agent also
restarts the killed worker)."""

import asyncio
import json
import os
import re
import signal
import socket
import time

import httpx
import pytest

from tests.fleet import spawn, start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


async def _stream(client: httpx.AsyncClient, url: str, content: str, max_tokens: int, progress: dict) -> dict:
    """One streamed greedy chat completion; returns its text, request id and the number of SSE chunks."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, chunks = "", 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        rid = resp.headers["x-request-id"]
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                piece = choice["delta"].get("content") or ""
                text += piece
                chunks += bool(piece)
            progress[content] = chunks
    return {"text": text, "id": rid, "chunks": chunks}


def _routing(fleet) -> dict:
    return httpx.get(fleet.url + "/admin/routing", timeout=10).json()


def test_stopped_heartbeats_mean_dead_then_the_worker_rejoins(model_dir):
    fleet = start_fleet(2, "", 2.0)
    try:
        stopped = fleet.workers[1]
        stopped.popen.send_signal(signal.SIGSTOP)  # alive but silent: only missing heartbeats tell
        t0 = time.monotonic()
        states = {}
        while time.monotonic() - t0 < 15:
            states = {w["name"]: w for w in _routing(fleet)["workers"]}
            if states["worker-1"]["state"] == "dead":
                break
            time.sleep(0.1)
        assert states["worker-1"]["state"] == "dead"
        assert time.monotonic() - t0 < 2.0 + 3.0  # the timeout, plus a sweep interval and polling slack
        old_id = states["worker-1"]["worker_id"]
        # New requests go to the live worker only.
        for i in range(4):
            r = httpx.post(
                fleet.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 3},
                timeout=60,
            )
            assert r.status_code == 200
            trace = httpx.get(f"{fleet.url}/v1/requests/{r.json()['id']}/trace").json()
            assert [a["worker"] for a in trace["attempts"]] == ["worker-0"]
        stopped.popen.send_signal(signal.SIGCONT)
        while time.monotonic() - t0 < 40:
            states = {w["name"]: w for w in _routing(fleet)["workers"]}
            if states["worker-1"]["state"] == "healthy":
                break
            time.sleep(0.1)
        assert states["worker-1"]["state"] == "healthy"
        assert states["worker-1"]["worker_id"] == old_id  # it came back under its old id
        fleet.wait_workers(2)
    finally:
        fleet.workers[1].popen.send_signal(signal.SIGCONT)
        fleet.stop()


def test_overload_gets_503_at_once_and_every_accepted_request_finishes(model_dir):
    fleet = start_fleet(0, "", 3.0, "--max-queue", "2")
    try:
        fleet.add_worker("only", "--max-num-seqs", "1")
        fleet.wait_workers(1)

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, dict]:
            r = await client.post(
                fleet.url + "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
                    "max_tokens": 24,
                    "ignore_eos": True,
                },
            )
            return r.status_code, time.monotonic(), {**r.json(), "retry_after": r.headers.get("retry-after")}

        async def burst():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(8)))

        results = asyncio.run(burst())
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(ok) == 3 and len(refused) == 5  # one running (max_num_seqs 1) and two queued were accepted
        assert all(r[2]["usage"]["completion_tokens"] == 24 for r in ok)
        assert all(r[2]["retry_after"] and "queue" in r[2]["error"]["message"] for r in refused)
        assert max(r[1] for r in refused) < min(r[1] for r in ok)  # refused before any accepted one finished
        assert _routing(fleet)["rejected"] == 5
    finally:
        fleet.stop()


def _raw_stream_request(port: int, body: dict) -> socket.socket:
    """Send a streaming request on a socket with a tiny receive buffer, and never read from it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_a_client_that_stops_reading_is_cut_off_without_slowing_others(model_dir):
    fleet = start_fleet(1, "", 3.0, "--slow-client-timeout", "2", "--stream-buffer-kb", "8")
    try:
        port = int(fleet.url.rsplit(":", 1)[1])
        # Lots of bytes per token (20 alternatives with their log-probabilities) fill the buffers quickly.
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
        }
        sock = _raw_stream_request(port, body)
        try:
            # A normal stream at the same time gets all its tokens while the other client reads nothing.
            progress: dict[str, int] = {}

            async def normal():
                async with httpx.AsyncClient(timeout=120) as client:
                    return await _stream(client, fleet.url, "Name three colors.", 48, progress)

            result = asyncio.run(normal())
            assert result["chunks"] >= 3  # streamed over several events
            # The stalled stream is cut off and its request aborted on the worker.
            t0 = time.monotonic()
            cut = False
            while time.monotonic() - t0 < 120:
                if any("cutting it off" in line for line in fleet.gateway.lines):
                    cut = True
                    break
                time.sleep(0.2)
            assert cut, "".join(fleet.gateway.lines[-20:])
            while time.monotonic() - t0 < 120:
                w = _routing(fleet)["workers"][0]
                if w["in_flight"] == 0 and w["running"] == 0:
                    break
                time.sleep(0.2)
            assert w["in_flight"] == 0 and w["running"] == 0
            # ... and the normal stream had every token: its text is the whole answer
            whole = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}]}
            whole |= {"max_tokens": 48, "temperature": 0}
            answer = httpx.post(fleet.url + "/v1/chat/completions", json=whole, timeout=60).json()
            assert answer["choices"][0]["message"]["content"] == result["text"]
        finally:
            sock.close()
    finally:
        fleet.stop()


def test_registry_persists_known_workers_across_a_gateway_restart(model_dir, tmp_path):
    db = tmp_path / "registry.sqlite"
    fleet = start_fleet(1, "", 3.0, "--state-db", str(db))
    try:
        before = {w["name"]: w["worker_id"] for w in _routing(fleet)["workers"]}
        assert list(before) == ["worker-0"] and os.path.getsize(db) > 0
        fleet.gateway.stop()
        port = fleet.url.rsplit(":", 1)[1]
        control_port = fleet.control.rsplit(":", 1)[1]
        fleet.gateway = spawn(
            "gateway", "--port", port, "--control-port", control_port, "--heartbeat-timeout", "3",
            "--state-db", str(db),
        )  # fmt: skip
        fleet.gateway.wait_for(re.compile("fleetserve gateway ready"))
        # Known from the file at once; then the worker registers again and gets its old id back.
        t0 = time.monotonic()
        states = {}
        while time.monotonic() - t0 < 30:
            states = {w["name"]: w for w in _routing(fleet)["workers"]}
            if states.get("worker-0", {}).get("state") == "healthy":
                break
            time.sleep(0.1)
        assert states["worker-0"]["state"] == "healthy"
        assert states["worker-0"]["worker_id"] == before["worker-0"]
        models = httpx.get(fleet.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [MODEL]
    finally:
        fleet.stop()
