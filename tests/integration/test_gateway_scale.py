"""Many simulated workers on one real gateway (the scale benchmark's simulator, 40 workers in one process): all
register and heartbeat, the gateway routes over its shortlist (more than 32 workers), spreads cold prompts and
sends a repeated prompt start back where it went."""

from __future__ import annotations

import re
import sys

import httpx
import pytest

from fleetserve.bench.sim_workers import ANSWER
from fleetserve.protocol.security import SECRET_ENV
from fleetserve.supervisor import Child, ChildSpec
from tests.fleet import FLEET_SECRET, free_port, spawn

pytestmark = pytest.mark.slow

COUNT = 40
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gateway(model_dir):
    port, control = free_port(), free_port()
    proc = spawn("gateway", "--port", str(port), "--control-port", str(control), "--heartbeat-timeout", "10")
    argv = [sys.executable, "-m", "fleetserve.bench.sim_workers", "--gateway", f"127.0.0.1:{control}"]
    sims = Child(ChildSpec("sims", argv + ["--count", str(COUNT)], {SECRET_ENV: FLEET_SECRET})).launch()
    try:
        proc.wait_for(re.compile("fleetserve gateway ready"))
        sims.wait_for(re.compile("sim workers ready"), 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        sims.stop(30)
        proc.stop()


def completion(url: str, prompt: list[int]) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def worker_of(url: str, reply: httpx.Response) -> str:
    trace = httpx.get(url + f"/v1/requests/{reply.headers['x-request-id']}/trace", timeout=30).json()
    return trace["attempts"][-1]["worker"]


def test_forty_simulated_workers_are_routed_over_a_shortlist(gateway):
    listed = httpx.get(gateway + "/admin/workers", timeout=30).json()["workers"]
    assert len(listed) == COUNT and {w["state"] for w in listed} == {"healthy"}
    assert all(w["cached_blocks_reported"] == 256 for w in listed)  # the heartbeats' block hashes arrived
    used = []
    for i in range(COUNT):  # cold prompts, one at a time: each goes to an idle worker, taking turns
        reply = completion(gateway, list(range(1000 + 100 * i, 1000 + 100 * i + 40)))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] in ANSWER
        used.append(worker_of(gateway, reply))
    assert len(set(used)) == COUNT
    shared = list(range(20, 52))
    first = completion(gateway, shared + [60, 61])
    again = completion(gateway, shared + [70, 71])
    assert first.status_code == again.status_code == 200
    routing = httpx.get(gateway + "/admin/routing", timeout=30).json()
    assert routing["decisions"]["count"] == COUNT + 2
    policy = routing["policies"][MODEL]
    assert policy["cache_hits"] == 1  # the second prompt went where the first had gone
    assert worker_of(gateway, first) == worker_of(gateway, again)
