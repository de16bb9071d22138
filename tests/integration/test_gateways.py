"""Two gateways over the same workers: each worker registers with both (`--gateway A,B`), either gateway serves
every request, and when one is killed mid-load a client that retries against the other loses nothing; the
workers drop the killed gateway's requests, serve on, and register again once it is back. The gateways share a
job store in Redis: a polling job is answered by either, and one the killed gateway was running is run again by
the other."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import pytest

from tests.chat import chat_body, complete, stream_text
from tests.fleet import READY_WORKER, free_port, spawn
from tests.helpers import PROMPTS

pytestmark = pytest.mark.slow

GATEWAY_READY = re.compile("fleetserve gateway ready")


JOB_LEASE_S = 1.5


class Pair:
    def __init__(self, job_store: str):
        self.job_store = job_store
        self.ports = [(free_port(), free_port()) for _ in range(2)]
        self.gateways = [self.start_gateway(i) for i in range(2)]
        controls = ",".join(f"127.0.0.1:{control}" for _, control in self.ports)
        self.workers = [
            spawn("worker", "--gateway", controls, "--name", f"worker-{i}", "--threads", "1", "--kv-cache-mb", "64")
            for i in range(2)
        ]
        try:
            for proc in [*self.gateways, *self.workers]:
                proc.wait_for(GATEWAY_READY if proc in self.gateways else READY_WORKER)
            for i in range(2):
                self.wait_healthy(i, 2)
        except BaseException:
            self.stop()
            raise

    def start_gateway(self, i: int):
        port, control = self.ports[i]
        return spawn(
            "gateway", "--port", str(port), "--control-port", str(control), "--heartbeat-timeout", "3",
            "--job-store", self.job_store, "--job-lease", str(JOB_LEASE_S),
        )  # fmt: skip

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i][0]}"

    def workers_of(self, i: int) -> dict[str, dict]:
        listed = httpx.get(self.url(i) + "/admin/workers", timeout=10).json()["workers"]
        return {w["name"]: w for w in listed}

    def wait_healthy(self, i: int, count: int, timeout: float = 120) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self.workers_of(i)
                if sum(w["state"] == "healthy" for w in found.values()) == count:
                    return found
            except httpx.HTTPError:
                found = {}
            assert time.monotonic() < deadline, f"gateway {i} has {found}"
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in [*self.workers, *self.gateways]:
            proc.stop()


@pytest.fixture(scope="module")
def pair(redis_url):
    p = Pair(redis_url)
    yield p
    p.stop()


def test_each_worker_registers_with_both_gateways_and_either_serves(pair):
    for i in range(2):
        workers = pair.workers_of(i)
        assert sorted(workers) == ["worker-0", "worker-1"] and all(w["state"] == "healthy" for w in workers.values())
    bodies = [chat_body(q) for q in PROMPTS[:4]]
    assert complete(pair.url(0), bodies) == complete(pair.url(1), bodies)


def test_a_session_started_through_one_gateway_is_found_by_the_other(pair):
    history = [{"role": "user", "content": " ".join(PROMPTS) + " Which of these is hardest?"}]
    first = httpx.post(
        pair.url(0) + "/v1/chat/completions", json={**chat_body("", max_tokens=8), "messages": history},
        headers={"X-Session-Id": "across"}, timeout=120,
    )  # fmt: skip
    assert first.status_code == 200, first.text
    deadline = time.monotonic() + 30  # gateway 1 learns of the session from the workers' heartbeats
    while not any(w["sessions_held"] for w in pair.workers_of(1).values()):
        assert time.monotonic() < deadline, pair.workers_of(1)
        time.sleep(0.2)
    history += [first.json()["choices"][0]["message"], {"role": "user", "content": "And the easiest?"}]
    second = httpx.post(
        pair.url(1) + "/v1/chat/completions", json={**chat_body("", max_tokens=8), "messages": history},
        headers={"X-Session-Id": "across"}, timeout=120,
    )  # fmt: skip
    assert second.status_code == 200, second.text
    assert (
        second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"] - 16
    )
    metrics = httpx.get(pair.url(1) + "/metrics", timeout=10).text
    assert re.search(r'fleetserve_session_turns_total\{[^}]*placement="held"[^}]*\} 1\.0', metrics), metrics[-3000:]
    assert httpx.delete(pair.url(1) + "/v1/sessions/across", timeout=10).status_code == 200


def poll(pair, i: int, request_id: str, until: tuple[str, ...] = ("completed", "failed"), timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(pair.url(i) + f"/v1/requests/{request_id}", timeout=10).json()
        if job.get("status") in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_a_job_one_gateway_finished_is_answered_by_the_other(pair):
    queued = httpx.post(pair.url(0) + "/v1/requests", json=chat_body(PROMPTS[2], max_tokens=8), timeout=30)
    assert queued.status_code == 202, queued.text
    done = poll(pair, 0, queued.json()["request_id"])
    assert done["status"] == "completed" and "request" not in done  # the stored request is not shown
    assert poll(pair, 1, queued.json()["request_id"]) == done


def test_a_gateway_killed_mid_load_loses_nothing_a_client_retries_elsewhere(pair):
    reference = complete(pair.url(1), [chat_body(q, max_tokens=24) for q in PROMPTS])
    job_body = chat_body(PROMPTS[1], max_tokens=32, ignore_eos=True)
    job_reference = complete(pair.url(1), [job_body])[0]

    async def load() -> tuple[list[str], int]:
        progress: dict[int, list] = {}
        retried = 0

        async def one(client: httpx.AsyncClient, k: int) -> str:
            nonlocal retried
            body = chat_body(PROMPTS[k], max_tokens=24)
            if k % 2:  # half the clients use the gateway that stays
                return await stream_text(client, pair.url(1), body, progress.setdefault(k, []))
            try:
                return await stream_text(client, pair.url(0), body, progress.setdefault(k, []))
            except (httpx.HTTPError, AssertionError):
                retried += 1  # the gateway went away mid-answer: ask the other one
                return await stream_text(client, pair.url(1), body, [])

        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(one(client, k)) for k in range(len(PROMPTS))]
            while len(progress) < len(PROMPTS) or min(len(p) for p in progress.values()) < 4:
                await asyncio.sleep(0.02)
                assert not all(t.done() for t in tasks), "every stream finished before the kill"
            job = await client.post(pair.url(0) + "/v1/requests", json=job_body)
            assert job.status_code == 202, job.text
            while (await client.get(pair.url(0) + f"/v1/requests/{job.json()['request_id']}")).json()[
                "status"
            ] != "running":
                await asyncio.sleep(0.02)
            pair.gateways[0].popen.send_signal(signal.SIGKILL)
            jobs.append(job.json()["request_id"])
            return await asyncio.gather(*tasks), retried

    jobs: list[str] = []

    texts, retried = asyncio.run(load())
    assert texts == reference
    assert retried == len(PROMPTS) // 2  # every stream on the killed gateway was cut and asked again

    # The job the killed gateway was running: once its lease lapses, the other gateway asked about it runs it again.
    job = poll(pair, 1, jobs[0])
    assert job["status"] == "completed" and job["taken_over"] == 1
    assert job["result"]["choices"][0]["message"]["content"] == job_reference

    # The workers dropped the killed gateway's requests: nothing runs and no KV block stays used.
    deadline = time.monotonic() + 30
    while True:
        workers = pair.workers_of(1)
        if all(w["state"] == "healthy" and w["running"] == 0 and w["kv_blocks_used"] == 0 for w in workers.values()):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)

    # The gateway comes back on its address; the workers register with it again by themselves.
    pair.gateways[0].stop()
    pair.gateways[0] = pair.start_gateway(0)
    pair.gateways[0].wait_for(GATEWAY_READY)
    pair.wait_healthy(0, 2)
    assert complete(pair.url(0), [chat_body(PROMPTS[0], max_tokens=24)]) == reference[:1]


def test_a_stage_node_takes_one_gateway_only(pair):
    controls = ",".join(f"127.0.0.1:{control}" for _, control in pair.ports)
    stage = spawn("worker", "--gateway", controls, "--role", "stage", "--threads", "1")
    assert stage.popen.wait(60) == 2
    assert any("a stage node takes its layers from one gateway" in line for line in stage.lines), stage.lines[-5:]
