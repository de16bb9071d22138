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
import asyncio, sys
sys.path.insert(0, {str(TESTS)!r})
from stub_worker import StubWorker
from fleetserve.model_files import DEFAULT_MODEL, load_arch, prepare_model_dir
from fleetserve.protocol import fleet_pb2 as pb, fleet_pb2_grpc as pb_grpc
from fleetserve.protocol.security import FleetCredentials, SECRET_ENV
from fleetserve.worker.agent import WorkerAgent
import os

async def main(gateway):
    credentials = FleetCredentials(os.environ[SECRET_ENV])
    model_dir = prepare_model_dir(DEFAULT_MODEL, progress=False)
    arch = load_arch(model_dir)
    service = StubWorker(model_dir)
    server = credentials.server()
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = credentials.server_port(server, "127.0.0.1:0")
    await server.start()
    info = pb.WorkerInfo(
        name="long-stub", address=f"127.0.0.1:{{port}}", model={LONG_MODEL!r}, role="replica", layer_start=0,
        layer_end=arch.num_layers, kv_blocks_total=2**16, block_size=16, device="cpu", max_model_len={LONG_CONTEXT},
        tokenizer_fingerprint=service.tokenizer.fingerprint, model_version="stub", max_num_seqs=8,
        architecture=arch.architecture, dtype="float32", num_layers=arch.num_layers,
    )
    stats = pb.WorkerStats(kv_blocks_total=2**16, kv_blocks_free=2**16)
    agent = WorkerAgent(gateway, info, stats=lambda: stats, credentials=credentials)
    print("stub worker starting", flush=True)
    await agent.run()

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
