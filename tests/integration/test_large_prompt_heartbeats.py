"""A huge prompt does not stall the gateway's event loop: while it is tokenized, the Control service keeps taking
heartbeats, so every worker stays healthy and the admin API keeps answering at once.

A real gateway and a real worker, plus a stand-in worker (tests/stub_worker.py) of a second model that claims a
context of a million tokens: the gateway refuses, before tokenizing, any prompt longer than sixteen characters a
token of the context, so only such a model makes it tokenize a 4 MiB prompt (about two million tokens, seconds of
work) before refusing it as too long.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fleetserve.model_files import DEFAULT_MODEL
from fleetserve.protocol.security import SECRET_ENV
from fleetserve.supervisor import Child, ChildSpec
from tests.fleet import FLEET_SECRET, Fleet, start_fleet

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
LONG_MODEL = "long-context"
LONG_CONTEXT = 2**20
STALL_LIMIT_S = 1.5
"""The longest an admin call may take: heartbeats are due every second, and two missed ones make a worker suspect."""

STUB = f"""
import asyncio, os, sys
sys.path.insert(0, {str(TESTS)!r})
from stub_worker import start_stub_worker
from fleetserve.protocol.security import FleetCredentials, SECRET_ENV

async def main(gateway):
    credentials = FleetCredentials(os.environ[SECRET_ENV])
    server, _, agent_task = await start_stub_worker(  # server: kept referenced while it serves
        gateway, "long-stub", credentials, model={LONG_MODEL!r}, max_model_len={LONG_CONTEXT}, kv_blocks=2**16
    )
    print("stub worker starting", flush=True)
    await agent_task

asyncio.run(main(sys.argv[1]))
"""


class Watcher(threading.Thread):
    """Polls /admin/workers until stopped, noting how long each answer took and every worker's state."""

    def __init__(self, fleet: Fleet):
        super().__init__(daemon=True)
        self.fleet = fleet
        self.samples: list[tuple[float, dict[str, str]]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(headers=self.fleet.headers, timeout=30) as client:
            while not self.halt.is_set():
                started = time.monotonic()
                try:
                    body = client.get(self.fleet.url + "/admin/workers").json()
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                took = time.monotonic() - started
                self.samples.append((took, {w["name"]: w["state"] for w in body["workers"]}))
                time.sleep(0.1)


def states(fleet: Fleet) -> dict[str, str]:
    body = httpx.get(fleet.url + "/admin/workers", headers=fleet.headers, timeout=30).json()
    return {w["name"]: w["state"] for w in body["workers"]}


def test_a_huge_prompt_does_not_stall_heartbeats(tmp_path):
    fleet = start_fleet(1)
    script = tmp_path / "long_stub.py"
    script.write_text(STUB)
    stub = Child(ChildSpec("long-stub", [sys.executable, str(script), fleet.control], {SECRET_ENV: FLEET_SECRET}))
    stub.launch()
    try:
        deadline = time.monotonic() + 120
        while states(fleet) != {"worker-0": "healthy", "long-stub": "healthy"}:
            assert stub.running, "".join(stub.tail())
            assert time.monotonic() < deadline, states(fleet)
            time.sleep(0.2)
        text = "".join(f"Line {i}: an ordinary sentence, with words and numbers in it. " for i in range(70_000))
        text = text[: 4 * 2**20]
        watcher = Watcher(fleet)
        watcher.start()
        time.sleep(1.0)
        with httpx.Client(headers=fleet.headers, timeout=120) as client:
            started = time.monotonic()
            long = client.post(
                fleet.url + "/v1/completions", json={"model": LONG_MODEL, "prompt": text, "max_tokens": 1}
            )
            long_s = time.monotonic() - started
            started = time.monotonic()
            chat = client.post(
                fleet.url + "/v1/chat/completions",
                json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1},
            )
            chat_s = time.monotonic() - started
        time.sleep(2.0)  # heartbeats due after the work, too
        watcher.halt.set()
        watcher.join()
    finally:
        stub.stop(5)
        fleet.stop()

    assert long.status_code == 400, long.text  # tokenized (two million tokens), then too long for the context
    assert "maximum context length" in long.json()["error"]["message"]
    assert chat.status_code == 400, chat.text  # refused without tokenizing
    assert chat_s < 5, chat_s
    assert not watcher.errors, watcher.errors
    assert len(watcher.samples) >= 10
    slowest = max(took for took, _ in watcher.samples)
    assert slowest < STALL_LIMIT_S, f"an admin call took {slowest:.2f}s while a {long_s:.1f}s prompt was tokenized"
    unhealthy = [seen for _, seen in watcher.samples if set(seen.values()) != {"healthy"}]
    assert not unhealthy, unhealthy[:3]
