"""A fleet spread over three hosts (Linux network namespaces on one bridge): the gateway on one, a worker on each
of two others, every process on its own address with mutual TLS, the fleet secret, API and admin keys, and the
gateway taking workers only from the hosts' network. Links are cut and restored under it, as a pulled cable or
a switch port going down would do."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetserve.certs import files_for, init_certs
from tests.fleet import READY_WORKER, Fleet, spawn
from tests.multihost.netns import Host, Network, unavailable

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
HTTP_PORT, CONTROL_PORT, WORKER_PORT = 8000, 50050, 50051
HEARTBEAT_TIMEOUT = 3.0
API_KEY, ADMIN_KEY = "multihost-api-key", "multihost-admin-key"
PROMPTS = [f"Tell me a long story about {thing}." for thing in ("the sea", "a fox", "a city", "rain", "a clock", "tea")]


@pytest.fixture(scope="module")
def network():
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    net = Network()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def hosts(network) -> dict[str, Host]:
    return {name: network.add_host(name) for name in ("gw", "h1", "h2")}


@pytest.fixture(scope="module")
def fleet(model_dir, network, hosts, tmp_path_factory):
    certs = tmp_path_factory.mktemp("multihost-tls")
    init_certs(certs, 2, [h.address for h in hosts.values()])
    gw = hosts["gw"]
    gateway = spawn(
        "gateway", "--host", "0.0.0.0", "--port", str(HTTP_PORT),
        "--control-host", "0.0.0.0", "--control-port", str(CONTROL_PORT),
        "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
        "--worker-networks", f"{network.subnet}.0/24",
        env=files_for(certs, "gateway").env(), inside=gw.inside,
    )  # fmt: skip
    fleet = Fleet(f"http://{gw.address}:{HTTP_PORT}", f"{gw.address}:{CONTROL_PORT}", gateway, [], API_KEY)
    try:
        for i, host in enumerate((hosts["h1"], hosts["h2"])):
            fleet.workers.append(
                spawn(
                    "worker",
                    "--gateway",
                    fleet.control,
                    "--name",
                    f"worker-{i}",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    str(WORKER_PORT),
                    "--advertise",
                    f"{host.address}:{WORKER_PORT}",
                    "--threads",
                    "1",
                    "--kv-cache-mb",
                    "64",
                    env=files_for(certs, f"worker-{i}").env(),
                    inside=host.inside,
                )  # fmt: skip
            )
        gateway.wait_for(re.compile("fleetserve gateway ready"))
        for proc in fleet.workers:
            proc.wait_for(READY_WORKER)
        fleet.wait_workers(2)
    except BaseException:
        fleet.stop()
        raise
    yield fleet
    fleet.stop()


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def workers(fleet: Fleet) -> list[dict]:
    return httpx.get(fleet.url + "/admin/workers", headers=ADMIN, timeout=10).json()["workers"]


def workers_seen_from(host: Host, fleet: Fleet) -> list[dict]:
    """/admin/workers asked from inside ``host`` (the tests' own link to the gateway may be the one cut)."""
    script = (
        "import json, urllib.request\n"
        f"req = urllib.request.Request({fleet.url + '/admin/workers'!r}, headers={ADMIN!r})\n"
        "print(urllib.request.urlopen(req, timeout=10).read().decode())\n"
    )
    done = subprocess.run([*host.inside, sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["workers"]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last})")


def body(prompt: str, stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def complete(fleet: Fleet, prompt: str) -> str:
    reply = httpx.post(fleet.url + "/v1/chat/completions", json=body(prompt, False), headers=fleet.headers, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_workers_on_two_hosts_serve_through_a_gateway_on_a_third(fleet, hosts):
    listed = {w["name"]: w for w in workers(fleet)}
    assert {n: (w["address"], w["state"]) for n, w in listed.items()} == {
        "worker-0": (f"{hosts['h1'].address}:{WORKER_PORT}", "healthy"),
        "worker-1": (f"{hosts['h2'].address}:{WORKER_PORT}", "healthy"),
    }
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda p: complete(fleet, p), PROMPTS[:4]))
    assert all(texts)
    served = {w["name"]: w for w in workers(fleet)}
    assert all(w["consecutive_failures"] == 0 for w in served.values())
    metrics = httpx.get(fleet.url + "/metrics", headers=fleet.headers, timeout=10).text
    assert 'fleetserve_requests_total{model="smollm2-135m-instruct",outcome="ok"} 4.0' in metrics, metrics[:2000]


class Stream(threading.Thread):
    """One streamed chat completion, read to its end."""

    def __init__(self, fleet: Fleet, prompt: str):
        super().__init__(daemon=True)
        self.fleet, self.prompt = fleet, prompt
        self.text, self.usage, self.error, self.chunks = "", None, None, 0

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.fleet.url + "/v1/chat/completions", json=body(self.prompt, True),
                headers=self.fleet.headers, timeout=120,
            ) as reply:  # fmt: skip
                if reply.status_code != 200:
                    self.error = f"{reply.status_code}: {reply.read().decode()}"
                    return
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.error = event["error"]
                    for choice in event.get("choices", []):
                        self.text += choice["delta"].get("content") or ""
                        self.chunks += 1
                    self.usage = event.get("usage") or self.usage
        except httpx.HTTPError as exc:
            self.error = repr(exc)


def test_a_worker_host_cut_off_mid_stream_fails_over_and_rejoins_under_its_id(fleet, hosts):
    before = {w["name"]: w["worker_id"] for w in workers(fleet)}
    streams = [Stream(fleet, p) for p in PROMPTS]
    for s in streams:
        s.start()
    wait_until(lambda: all(s.chunks >= 3 for s in streams), 120, "every stream under way")
    on_h1 = {w["name"]: w["in_flight"] for w in workers(fleet)}["worker-0"]
    assert on_h1 > 0, "no stream ran on the host about to be cut"
    hosts["h1"].cut()
    try:
        for s in streams:
            s.join(120)
        assert [s.error for s in streams] == [None] * len(streams)
        assert [s.usage["completion_tokens"] for s in streams] == [32] * len(streams)
        states = {w["name"]: w["state"] for w in workers(fleet)}
        assert states == {"worker-0": "dead", "worker-1": "healthy"}
    finally:
        hosts["h1"].restore()

    def rejoined():
        listed = workers(fleet)
        live = {w["name"]: w["worker_id"] for w in listed if w["state"] == "healthy"}
        return live if len(listed) == 2 and live == before else None

    wait_until(rejoined, 60, "worker-0 back under its old id, no other record")
    # Every stream that failed over gave the text an uninterrupted request gives.
    with ThreadPoolExecutor(len(streams)) as pool:
        again = list(pool.map(lambda s: complete(fleet, s.prompt), streams))
    assert [s.text for s in streams] == again


def test_a_gateway_cut_off_past_the_heartbeat_timeout_converges_when_restored(fleet, hosts):
    gw = hosts["gw"]
    before = {w["name"]: w["worker_id"] for w in workers(fleet)}
    assert len(before) == 2
    gw.cut()
    try:
        wait_until(
            lambda: all(w["state"] == "dead" for w in workers_seen_from(gw, fleet)),
            HEARTBEAT_TIMEOUT * 4,
            "the isolated gateway declares its workers dead",
        )
    finally:
        gw.restore()

    def converged():
        listed = workers(fleet)
        live = {w["name"]: w["worker_id"] for w in listed if w["state"] == "healthy"}
        return live if len(listed) == 2 and live == before else None

    wait_until(converged, 60, "both workers healthy again under their ids, no duplicate records")
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda p: complete(fleet, p), PROMPTS[:4]))
    assert all(texts)
    assert {w["state"] for w in workers(fleet)} == {"healthy"}
