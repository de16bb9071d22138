"""The admin API and `fleetserve nodes` against a real gateway: list, join a local worker, drain, stop, errors."""

import subprocess
import sys
import time

import httpx
import pytest

from tests.fleet import start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ADMIN = "admin-secret"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(1, "", 3.0, "--admin-key", ADMIN)
    yield f
    f.stop()


def workers(fleet) -> dict[str, dict]:
    r = httpx.get(fleet.url + "/admin/workers", headers=H, timeout=10)
    assert r.status_code == 200
    return {w["name"]: w for w in r.json()["workers"]}


def wait_state(fleet, name: str, states: set, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < deadline:
        seen = workers(fleet).get(name, {"state": "gone"})
        if seen["state"] in states:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {states}: {seen}")


def nodes(fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve", "nodes", *args, "--url", fleet.url, "--admin-key", ADMIN],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_admin_key_guards_admin_routes_only(fleet):
    assert httpx.get(fleet.url + "/admin/workers", timeout=10).status_code == 401
    wrong = httpx.get(fleet.url + "/admin/workers", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(fleet.url + "/v1/models", timeout=10).status_code == 200


def test_list_shows_each_worker_with_its_state_and_load(fleet):
    w = workers(fleet)["worker-0"]
    assert w["state"] == "healthy" and w["model"] == MODEL and w["role"] == "replica"
    assert w["address"].startswith("127.0.0.1:") and w["device"] == "cpu" and w["memory_cap_bytes"] > 0
    assert w["kv_blocks_total"] > 0 and 0 <= w["kv_usage"] <= 1
    out = nodes(fleet, "list")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "STATE", "MODEL"] and row.split()[:3] == ["worker-0", "healthy", MODEL]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": MODEL, "max_memory_mb": 100}, 400, "needs at least"),
        ({"model": "no-such-model"}, 404, "no-such-model"),
        ({"model": MODEL, "role": "router"}, 400, "role"),
        ({"model": MODEL, "role": 7}, 400, "role"),
        ({"model": MODEL, "device": "tpu"}, 400, "device"),
        ({"model": MODEL, "colour": "red"}, 400, "colour"),
        ({"max_memory_mb": 900}, 400, "model"),
        ({"model": MODEL, "max_memory_mb": -1}, 400, "max_memory_mb"),
    ],
)
def test_join_refuses_bad_requests_clearly(fleet, body, status, words):
    r = httpx.post(fleet.url + "/admin/workers", json=body, headers=H, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_unknown_workers_are_404(fleet):
    for action in ("drain", "stop"):
        r = httpx.post(f"{fleet.url}/admin/workers/nobody/{action}", headers=H, timeout=10)
        assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]
    out = nodes(fleet, "drain", "nobody")
    assert out.returncode == 2 and "404" in out.stderr


def test_join_then_drain_then_stop_a_local_worker(fleet):
    out = nodes(fleet, "join", "--max-memory-mb", "1000")
    assert out.returncode == 0 and "started local-1" in out.stdout, out.stderr
    joined = wait_state(fleet, "local-1", {"healthy"})
    assert joined["local"]["kv_cache_mb"] == 1000 - 514 - 256 and joined["local"]["running"]
    # It serves requests like any other worker.
    r = httpx.post(fleet.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert nodes(fleet, "drain", "local-1").returncode == 0
    assert workers(fleet)["local-1"]["state"] == "draining"
    stop = httpx.post(fleet.url + "/admin/workers/local-1/stop", headers=H, timeout=10)
    assert stop.status_code == 202 and stop.json()["terminating"]
    wait_state(fleet, "local-1", {"gone"}, timeout=60)  # drained, deregistered, exited
    assert workers(fleet)["worker-0"]["state"] == "healthy"


def test_stop_tells_a_worker_the_gateway_did_not_start_to_drain_and_exit(fleet):
    # Runs last: it stops the module's own worker.
    out = nodes(fleet, "stop", "worker-0")
    assert out.returncode == 0, out.stderr
    assert fleet.workers[0].popen.wait(60) == 0  # drained, deregistered, exited cleanly
    wait_state(fleet, "worker-0", {"gone"}, timeout=30)
