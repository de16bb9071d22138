"""Node agents with real processes: a gateway, a node agent that runs a deployment's replicas, kill -9 of a replica
under load, scaling through the admin API, a worker that crashes at start, and a second node agent."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from fleetserve import nodes_cli
from fleetserve.cli import build_parser
from tests.browser import console_page
from tests.chat import MODEL, chat_body, complete, stream_text, trace
from tests.fleet import Fleet, Proc, spawn, start_fleet
from tests.helpers import PROMPTS

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer node-admin-key"}
NODE_READY = re.compile(r"fleetserve node ready")
WAIT_S = 180.0  # generous: outcomes are checked, not speed
QUESTIONS = PROMPTS  # 8 distinct prompts
IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


@dataclass
class NodeFleet:
    fleet: Fleet
    agent: Proc
    logs: Path

    def get(self, path: str) -> dict:
        resp = httpx.get(self.fleet.url + path, headers=ADMIN, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def deploy(self, body: dict, model: str = MODEL) -> dict:
        resp = httpx.put(f"{self.fleet.url}/admin/deployments/{model}", json=body, headers=ADMIN, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def deployment(self, role: str = "replica") -> dict:
        return next(d for d in self.get("/admin/deployments")["deployments"] if d["role"] == role)

    def node(self, name: str) -> dict:
        return next(n for n in self.get("/admin/nodes")["nodes"] if n["name"] == name)

    def wait(self, check, what: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                state = json.dumps({"deployments": self.get("/admin/deployments"), "nodes": self.get("/admin/nodes")})
                raise AssertionError(f"timed out waiting for {what}; the gateway says {state[:6000]}")
            time.sleep(0.2)

    def wait_serving(self, count: int, role: str = "replica") -> dict:
        def check():
            d = self.deployment(role)
            s = d["status"]
            return d if s["planned"] == s["serving"] == s["running"] == count else None

        return self.wait(check, f"{count} serving {role} worker(s)")


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def node_agent(fleet: Fleet, name: str, logs: Path, *extra: str) -> Proc:
    agent = spawn(
        "node", "--gateway", fleet.control, "--name", name, "--log-dir", str(logs), "--restart-backoff", "0.5",
        *extra,
    )  # fmt: skip
    agent.wait_for(NODE_READY, timeout=60)
    return agent


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("node-logs")
    fleet = start_fleet(0, "", 3.0, "--admin-key", ADMIN["Authorization"][7:])
    agent = None
    try:
        agent = node_agent(fleet, "node-a", logs, "--max-workers", "3", "--cpus", "3", "--max-memory-mb", "3200")
        nf = NodeFleet(fleet, agent, logs)
        nf.deploy({"replicas": 2, "memory_mb": 1000})
        nf.wait_serving(2)
        yield nf
    finally:
        if agent is not None:
            agent.stop()
        fleet.stop()


async def _streams(url: str, progress: dict) -> list[tuple[str, str]]:
    """Every question streamed at once (greedy, 24 tokens): (request id, text) each."""

    async def one(client: httpx.AsyncClient, question: str) -> tuple[str, str]:
        events: list = []
        progress[question] = events
        text = await stream_text(client, url, chat_body(question, max_tokens=24), events)
        return events[0], text

    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*(one(client, q) for q in QUESTIONS))


def test_a_killed_replica_is_restarted_by_its_node_and_every_stream_completes_unchanged(nodes):
    url = nodes.fleet.url
    reference = asyncio.run(_streams(url, {}))
    victim = next(w for w in nodes.node("node-a")["workers"] if w["state"] == "running")
    progress: dict[str, list] = {}

    async def disturbed():
        task = asyncio.create_task(_streams(url, progress))
        # Kill once every stream has shown text: each is mid-answer on one of the two replicas.
        while len(progress) < len(QUESTIONS) or min(len(p) for p in progress.values()) < 3:
            await asyncio.sleep(0.02)
            assert not task.done(), "the streams finished before the kill"
        psutil.Process(victim["pid"]).send_signal(signal.SIGKILL)
        return await task

    results = asyncio.run(disturbed())
    assert [text for _, text in results] == [text for _, text in reference]
    resumed = [t for t in (trace(url, rid) for rid, _ in results) if len(t["attempts"]) > 1]
    assert resumed, "no stream was running on the killed replica"
    for t in resumed:
        first, second = t["attempts"][0], t["attempts"][1]
        assert first["worker"] == victim["name"] and first["outcome"] == "failed_over" and first["tokens"] > 0
        assert second["outcome"] == "finished" and second["resumed_tokens"] == first["tokens"]

    # The node starts it again (same name, a new process) and it serves again.
    def back():
        w = next(w for w in nodes.node("node-a")["workers"] if w["name"] == victim["name"])
        return w if w["restarts"] >= 1 and w["state"] == "running" and w["pid"] != victim["pid"] else None

    again = nodes.wait(back, "the killed replica to run again")
    assert again["last_exit_code"] == -signal.SIGKILL
    nodes.wait_serving(2)
    workers = [w for w in nodes.get("/admin/workers")["workers"] if w["name"] == victim["name"]]
    assert [w["state"] for w in workers] == ["healthy"]  # its dead record was cleaned up

    def relayed():  # its heartbeats come through its node agent's heartbeat relay (from its first one on)
        listed = [w for w in nodes.get("/admin/workers")["workers"] if w["name"] == victim["name"]]
        return [w["heartbeats_via"] for w in listed] == ["relay"]

    nodes.wait(relayed, "the restarted replica's heartbeats through its node agent")
    assert complete(url, [chat_body(q) for q in QUESTIONS[:2]])
    log = (nodes.logs / f"worker-{victim['name']}.log").read_text()
    assert log.count("--- started") == 2 and log.count("fleetserve worker ready") == 2
    metrics = httpx.get(url + "/metrics", timeout=10).text
    series = f'fleetserve_node_worker_restarts_total{{model="{MODEL}",node="node-a",worker="{victim["name"]}"}} 1.0'
    assert series in metrics


def test_scaling_up_and_down_through_the_cli_drains_before_stopping(nodes, capsys):
    def scale(replicas: int) -> str:
        key = ADMIN["Authorization"][7:]
        args = ["nodes", "scale", "--url", nodes.fleet.url, "--admin-key", key, "--model", MODEL]
        assert nodes_cli.run(build_parser().parse_args([*args, "--replicas", str(replicas)])) == 0
        return capsys.readouterr().out

    assert scale(3).startswith(f"deployment {MODEL}/replica: 3 desired (0..3), 3 placed")
    nodes.wait_serving(3)
    before = {w["name"] for w in nodes.node("node-a")["workers"]}
    # Scale down while answers stream: the worker that goes finishes what it runs before it exits.
    progress: dict[str, list] = {}

    async def scale_down_midway() -> list[tuple[str, str]]:
        task = asyncio.create_task(_streams(nodes.fleet.url, progress))
        while len(progress) < len(QUESTIONS) or min(len(p) for p in progress.values()) < 3:
            await asyncio.sleep(0.02)
            assert not task.done(), "the streams finished before the scale-down"
        await asyncio.to_thread(scale, 2)
        return await task

    assert all(text for _, text in asyncio.run(scale_down_midway()))
    nodes.wait_serving(2)
    (stopped,) = before - {w["name"] for w in nodes.node("node-a")["workers"]}
    log = (nodes.logs / f"worker-{stopped}.log").read_text()
    assert re.search(r"draining \S+ \(\d+ request\(s\) to finish\)", log) and "drained" in log, log[-2000:]
    assert stopped not in {w["name"] for w in nodes.get("/admin/workers")["workers"]}  # it deregistered


@pytest.fixture(scope="module")
def node_b(nodes):
    """A second node agent (standing for another machine), labelled zone=b, quick to give up on a crash loop."""
    agent = node_agent(
        nodes.fleet, "node-b", nodes.logs, "--max-workers", "1", "--cpus", "1", "--max-memory-mb", "1500",
        "--labels", "zone=b", "--crash-loop-restarts", "3", "--restart-backoff", "0.2",
    )  # fmt: skip
    yield agent
    resp = httpx.delete(f"{nodes.fleet.url}/admin/deployments/{MODEL}?role=prefill", headers=ADMIN, timeout=30)
    assert resp.status_code in (200, 404), resp.text
    agent.stop()


def test_a_worker_that_crashes_at_start_is_reported_crash_looping_without_a_busy_loop(nodes, node_b):
    # A prefill worker on a GPU this machine lacks, placed on node-b by its label: it crashes at start, every time.
    nodes.deploy({"role": "prefill", "replicas": 1, "memory_mb": 1000, "device": "cuda:0", "labels": {"zone": "b"}})

    def looping():
        return nodes.deployment("prefill")["status"]["crash_looping"] or None

    (looped,) = nodes.wait(looping, "the prefill worker to be crash-looping")
    assert looped["node"] == "node-b" and looped["exit_code"] != 0
    assert any("CUDA" in line or "cuda" in line for line in looped["last_lines"]), looped["last_lines"]
    worker = next(w for w in nodes.node("node-b")["workers"] if w["name"] == looped["worker"])
    assert worker["restarts"] == 2 and worker["crashes"] == 3
    log = (nodes.logs / f"worker-{looped['worker']}.log").read_text()
    assert log.count("--- started") == 3  # the first start and two restarts, with growing waits between them
    metrics = httpx.get(nodes.fleet.url + "/metrics", timeout=10).text
    series = f'fleetserve_node_worker_crash_looping{{model="{MODEL}",node="node-b",worker="{looped["worker"]}"}} 1.0'
    assert series in metrics
    # No busy loop: the agent sleeps while its worker is left crash-looping.
    process = psutil.Process(node_b.popen.pid)
    used = sum(process.cpu_times()[:2])
    time.sleep(3)
    assert sum(process.cpu_times()[:2]) - used < 1.0
    assert nodes.node("node-b")["workers"][0]["restarts"] == 2


def test_the_console_shows_desired_against_actual_the_crash_loop_and_the_node_agents(nodes, node_b):
    with console_page(nodes.fleet.url, ADMIN["Authorization"][7:]) as page:
        replicas = page.locator(f'#deployments .deployment[data-model="{MODEL}"][data-role="replica"]')
        replicas.wait_for()
        assert replicas.locator('[data-count="desired"] dd').inner_text() == "2"
        assert replicas.locator('[data-count="serving"] dd').inner_text() == "2"
        prefill = page.locator('#deployments .deployment[data-role="prefill"]')
        assert "is crash-looping" in prefill.locator(".crash-looping strong").inner_text()
        assert "CUDA" in prefill.locator(".crash-looping pre").inner_text().upper()
        agents = page.locator("#node-agents .node-agent")
        assert [agents.nth(i).get_attribute("data-node") for i in range(agents.count())] == ["node-a", "node-b"]
        page.locator("#deployments").screenshot(path=str(IMG / "console-deployments.png"))


def test_a_changed_deployment_replaces_the_crash_looping_worker_and_a_killed_agent_leaves_no_orphan(nodes, node_b):
    looped = nodes.deployment("prefill")["status"]["crash_looping"][0]["worker"]
    nodes.deploy({"role": "prefill", "device": "cpu"})
    nodes.wait_serving(1, "prefill")
    (served,) = nodes.node("node-b")["workers"]
    assert served["state"] == "running" and served["name"] != looped
    record = next(w for w in nodes.get("/admin/workers")["workers"] if w["name"] == served["name"])
    assert record["state"] == "healthy" and record["role"] == "prefill"
    assert complete(nodes.fleet.url, [chat_body(q) for q in QUESTIONS[:3]])
    # Killing node-b's agent outright orphans nothing: its worker gets SIGTERM, drains, deregisters and exits.
    node_b.popen.kill()

    def gone():
        registered = any(w["name"] == served["name"] for w in nodes.get("/admin/workers")["workers"])
        return not registered and exited(served["pid"]) or None

    nodes.wait(gone, "node-b's worker to leave")
    # It deregistered: a worker killed with its agent would stay listed (dead) until node-b is declared lost.
    assert nodes.node("node-b")["state"] == "disconnected"
    resp = httpx.delete(f"{nodes.fleet.url}/admin/deployments/{MODEL}?role=prefill", headers=ADMIN, timeout=30)
    assert resp.status_code == 200, resp.text


def test_deployments_need_the_admin_key_and_bad_ones_get_a_clear_error(nodes):
    url = nodes.fleet.url
    resp = httpx.put(f"{url}/admin/deployments/{MODEL}", json={"replicas": 1}, timeout=10)
    assert resp.status_code == 401
    resp = httpx.put(f"{url}/admin/deployments/{MODEL}", json={"replicas": -2}, headers=ADMIN, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "replicas"
    resp = httpx.put(f"{url}/admin/deployments/{MODEL}", json={"memory_mb": 300}, headers=ADMIN, timeout=10)
    assert resp.status_code == 400 and "too small" in resp.json()["error"]["message"]
    assert nodes.deployment()["memory_mb"] == 1000  # unchanged
    resp = httpx.delete(f"{url}/admin/deployments/{MODEL}?role=decode", headers=ADMIN, timeout=10)
    assert resp.status_code == 404


def test_autoscaling_adds_a_worker_under_a_load_ramp_and_goes_back_to_the_minimum_after_it(nodes):
    # Scaled on TTFT here (the queue is checked in the unit tests): a burst of requests that one worker answers
    # with a first token slower than 50 ms adds a worker; 3 s without requests takes it away again.
    policy = {"queue_per_replica": 100, "kv_usage": 1, "ttft_p90_s": 0.05, "window_s": 5, "up_after_s": 1,
              "up_cooldown_s": 1, "down_after_s": 30, "down_cooldown_s": 1, "idle_after_s": 3}  # fmt: skip
    nodes.deploy({"replicas": 1, "min_replicas": 1, "max_replicas": 2, "autoscale": policy})
    nodes.wait_serving(1)
    bodies = [chat_body(f"{q} Answer at length.", max_tokens=40) for q in QUESTIONS * 3]
    answers = complete(nodes.fleet.url, bodies)
    assert len(answers) == len(bodies) and all(answers)

    def decisions():
        found = nodes.deployment()["autoscaling"]["decisions"]
        return found if [d["direction"] for d in found] == ["up", "down"] else None

    up, down = nodes.wait(decisions, "a scale-up and then a scale-down")
    assert (up["from"], up["to"]) == (1, 2) and "TTFT p90" in up["reason"]
    assert (down["from"], down["to"]) == (2, 1) and "no requests" in down["reason"]
    nodes.wait_serving(1)
    assert any("autoscale" in line and "1 -> 2" in line for line in nodes.fleet.gateway.lines)
    metrics = httpx.get(nodes.fleet.url + "/metrics", timeout=10).text
    assert f'fleetserve_autoscale_decisions_total{{direction="up",model="{MODEL}"}} 1.0' in metrics
