"""Processes coming and going: `fleetserve up`, a worker draining on SIGTERM, a gateway restart, bad tokens."""

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.fleet import free_port, spawn, start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def test_up_serves_two_models_keeps_its_workers_running_and_stops_cleanly(model_dir, tmp_path):
    """`up` serves two models side by side (the same weights under a second name, with its own default
    temperature), restarts a worker and then its gateway killed under it, hands its gateway and engine settings to
    the processes it starts (keys never in arguments), and stops them all on Ctrl-C."""
    port, control = free_port(), free_port()
    admin = "admin-secret-for-up"
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"creative": {"temperature": 1.3}}))
    up = spawn(
        "up", "--model", MODEL, "--model", f"creative={MODEL}", "--port", str(port), "--control-port", str(control),
        "--kv-cache-mb", "64", "--policy", "round-robin", "--admin-key", admin, "--models", str(models),
    )  # fmt: skip
    try:
        up.wait_for(re.compile("fleetserve is ready: 2 worker"), timeout=180)
        children = psutil.Process(up.popen.pid).children(recursive=True)
        assert len(children) == 3  # the gateway and two workers
        assert not [c for c in children if any(admin in arg for arg in c.cmdline())]
        url = f"http://127.0.0.1:{port}"
        listed = {m["id"]: m["fleetserve"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        assert {MODEL, "creative"} <= set(listed) and listed["creative"]["temperature"] == 1.3
        assert listed[MODEL]["healthy_workers"] == listed["creative"]["healthy_workers"] == 1

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                bodies = [{"model": m, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 5,
                           "ignore_eos": True} for i in range(4) for m in (MODEL, "creative")]  # fmt: skip
                return await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=b) for b in bodies))

        answers = asyncio.run(both())
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5 for r in answers), [
            r.text for r in answers
        ]
        served = {(r.json()["model"], trace_worker(url, r.headers["x-request-id"], admin)) for r in answers}
        assert served == {(MODEL, "worker-0"), ("creative", "worker-1")}  # each model on its own worker
        assert httpx.get(url + "/admin/workers", timeout=30).status_code == 401  # the gateway has the admin key
        auth = {"Authorization": f"Bearer {admin}"}
        workers = httpx.get(url + "/admin/workers", headers=auth, timeout=30).json()["workers"]
        # the workers' KV cache: --kv-cache-mb 64, rounded down to whole blocks (the default is 512)
        assert len(workers) == 2 and all(63 * 2**20 < w["memory_cap_bytes"] <= 64 * 2**20 for w in workers)
        routing = httpx.get(url + "/admin/routing", headers=auth, timeout=30).json()
        assert "round-robin" in json.dumps(routing)  # the gateway's policy
        # A worker killed under `up` is started again and serves again.
        killed = next(c for c in children if "worker-1" in c.cmdline())
        killed.kill()
        up.wait_for(re.compile(r"worker-1 was killed by SIGKILL.*starting it again"), timeout=60)

        def creative_back() -> bool:
            body = httpx.get(url + "/v1/models", timeout=30).json()
            return any(m["id"] == "creative" and m["fleetserve"]["healthy_workers"] == 1 for m in body["data"])

        deadline = time.monotonic() + 120
        while not creative_back():
            assert time.monotonic() < deadline, "the restarted worker did not serve again"
            time.sleep(0.2)
        # So is the gateway: the workers, still running, register with the new one.
        gateway = next(c for c in psutil.Process(up.popen.pid).children() if "gateway" in c.cmdline())
        gateway.kill()
        up.wait_for(re.compile(r"gateway was killed by SIGKILL.*starting it again"), timeout=60)
        deadline = time.monotonic() + 120
        while (both_back := _healthy_models(url)) != {MODEL: 1, "creative": 1}:
            assert time.monotonic() < deadline, f"the workers did not come back to the new gateway: {both_back}"
            time.sleep(0.2)
        children = psutil.Process(up.popen.pid).children(recursive=True)
        assert len(children) == 3
    finally:
        code = up.stop(signal.SIGINT, timeout=60)
    assert code == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _healthy_models(url: str) -> dict[str, int]:
    try:
        body = httpx.get(url + "/v1/models", timeout=5).json()
    except httpx.HTTPError:
        return {}  # the gateway is starting again
    return {m["id"]: m["fleetserve"]["healthy_workers"] for m in body["data"]}


def trace_worker(url: str, request_id: str, admin: str) -> str:
    """The worker that served a finished request, from its trace."""
    trace = httpx.get(f"{url}/v1/requests/{request_id}/trace", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    return trace.json()["attempts"][-1]["worker"]


def test_sigterm_drains_in_flight_requests():
    fleet = start_fleet(workers=1)
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about rivers."}],
            "max_tokens": 40,
            "ignore_eos": True,
            "temperature": 0,
        }
        result = {}

        def call():
            result["r"] = httpx.post(fleet.url + "/v1/chat/completions", json=body, timeout=120)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(1.0)  # the request is running on the only worker
        fleet.workers[0].popen.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 40
        assert fleet.workers[0].popen.wait(30) == 0
        # gone from the gateway: no worker, so not ready, and requests get 503 with Retry-After
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(fleet.url + "/ready").status_code != 503:
            time.sleep(0.1)
        r = httpx.post(fleet.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    finally:
        fleet.stop()


def test_worker_reregisters_after_gateway_restart():
    fleet = start_fleet(workers=1, heartbeat_timeout=3.0)
    try:
        port = fleet.url.rsplit(":", 1)[1]
        control_port = fleet.control.rsplit(":", 1)[1]
        fleet.gateway.stop()
        fleet.gateway = spawn("gateway", "--port", port, "--control-port", control_port)
        fleet.gateway.wait_for(re.compile("fleetserve gateway ready"))
        fleet.wait_workers(1, timeout=30)
        r = httpx.post(
            fleet.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}, timeout=60
        )
        assert r.status_code == 200
    finally:
        fleet.stop()


def test_wrong_registration_token_is_refused():
    port, control = free_port(), free_port()
    gateway = spawn("gateway", "--port", str(port), "--control-port", str(control), "--registration-token", "s3cret")
    try:
        gateway.wait_for(re.compile("fleetserve gateway ready"))
        worker = spawn(
            "worker",
            "--gateway",
            f"127.0.0.1:{control}",
            "--registration-token",
            "wrong",
            "--kv-cache-mb",
            "16",
            "--threads",
            "1",
        )
        assert worker.popen.wait(120) == 3
        assert any("registration refused" in line for line in worker.lines)
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 503
    finally:
        gateway.stop()
