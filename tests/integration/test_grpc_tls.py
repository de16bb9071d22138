"""A fleet over mutual TLS with certificates from `fleetserve certs init`: it serves and fails over, and a
worker whose certificate another CA signed cannot join; `fleetserve up --tls` answers."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from fleetserve.certs import files_for
from tests.fleet import free_port, spawn, start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def certs_init(folder, workers: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleetserve", "certs", "init", str(folder), "--workers", str(workers)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def tls(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    certs_init(root / "fleet", 2)
    certs_init(root / "other", 1)
    return root


@pytest.fixture(scope="module")
def fleet(tls):
    f = start_fleet(
        2,
        "",
        3.0,
        gateway_env=files_for(tls / "fleet", "gateway").env(),
        per_worker_env=[files_for(tls / "fleet", f"worker-{i}").env() for i in range(2)],
    )
    yield f
    f.stop()


def routing(fleet) -> dict[str, dict]:
    return {w["name"]: w for w in httpx.get(fleet.url + "/admin/routing", timeout=10).json()["workers"]}


def test_a_stream_survives_the_kill_of_its_worker_over_mutual_tls(fleet):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 48,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", fleet.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
            if len(events) >= 4:
                break
        busy = [name for name, w in routing(fleet).items() if w["in_flight"] > 0]
        assert len(busy) == 1
        fleet.workers[int(busy[0].rsplit("-", 1)[1])].popen.kill()
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 48
    assert any(e["choices"] and e["choices"][0].get("finish_reason") == "length" for e in events)


def test_a_worker_with_another_cas_certificate_cannot_join(fleet, tls):
    before = set(routing(fleet))
    rogue, _ = fleet.add_worker("rogue", env=files_for(tls / "other", "worker-0").env())
    time.sleep(3)  # several registration attempts (their backoff starts at 0.2 s)
    assert "rogue" not in routing(fleet) and set(routing(fleet)) == before
    assert rogue.popen.poll() is None  # it keeps trying, never admitted


def test_up_with_tls_answers(model_dir):
    port = free_port()
    up = spawn("up", "--tls", "--workers", "1", "--port", str(port), "--control-port", str(free_port()))
    try:
        up.wait_for(re.compile("fleetserve is ready: 1 worker"), timeout=180)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        assert up.stop(signal.SIGINT, timeout=60) == 0


def test_the_http_api_over_tls(tls):
    """--http-tls-cert/--http-tls-key: the API answers over HTTPS, verified against the fleet CA."""
    files = files_for(tls / "fleet", "gateway")
    port = free_port()
    gateway = spawn(
        "gateway",
        "--port",
        str(port),
        "--control-port",
        str(free_port()),
        "--http-tls-cert",
        str(files.cert),
        "--http-tls-key",
        str(files.key),
    )
    try:
        gateway.wait_for(re.compile(rf"fleetserve gateway ready: https://127\.0\.0\.1:{port}"), timeout=60)
        ca = ssl.create_default_context(cafile=str(tls / "fleet" / "ca.pem"))
        reply = httpx.get(f"https://127.0.0.1:{port}/health", verify=ca, timeout=10)
        assert reply.status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no HTTP answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).raise_for_status()
    finally:
        gateway.stop()
