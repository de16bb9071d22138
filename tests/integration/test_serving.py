"""A gateway and two workers as real processes, used through the official openai client and plain HTTP."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from fleetserve.contract import SamplingParams
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from tests.fleet import READY_WORKER, start_fleet, worker_metadata

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEY = "test-key-123"
QUESTION = "Why is the sky blue?"


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(2, KEY, 3.0, "--preprocess-workers", "2")  # tokenization in helper processes
    yield f
    f.stop()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_ready(fleet, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    body = fleet.ready()
    assert body["ready"] is True and body["models"][MODEL]["healthy_workers"] == 2
    assert httpx.get(fleet.url + "/health").json() == {"status": "ok"}  # no key needed
    anonymous = httpx.get(fleet.url + "/ready", timeout=30)  # a Kubernetes probe's view: ready or not, no more
    assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}
    wrong = httpx.get(fleet.url + "/ready", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert wrong.json() == {"ready": True}


def test_chat_streamed_equals_non_streamed_equals_engine(client, engine, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 24 and plain.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    ids = engine.generate([tokenizer.encode_chat(messages)], SamplingParams(max_tokens=24))[0]
    assert tokenizer.decode(ids) == text


def test_completions_with_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    full = r.choices[0].text
    assert "." in full
    cut = full.index(".")
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stop=["."]
    )
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stop=["."], stream=True
        )
    )
    assert streamed == full[:cut]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=1.0, seed=42
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_errors(fleet, client):
    h = fleet.headers
    r = httpx.post(fleet.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(
        fleet.url + "/v1/chat/completions", content=b"{not json", headers={**h, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(
        fleet.url + "/v1/chat/completions",
        headers=h,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(
        fleet.url + "/v1/chat/completions",
        headers=h,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 9000},
    )
    err = r.json()["error"]
    assert r.status_code == 400 and "maximum context length is 8192" in err["message"] and "9000" in err["message"]
    r = httpx.post(
        fleet.url + "/v1/chat/completions",
        headers=h,
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_client_disconnect_aborts_on_the_worker(fleet):
    addresses = [p.wait_for(READY_WORKER).group(2) for p in fleet.workers]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", fleet.url + "/v1/chat/completions", json=body, headers=fleet.headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        running = sum(_stats(a).running for a in addresses)
        assert running == 1
    # The connection is closed: the request must leave the worker, freeing its KV blocks.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(_stats(a).running for a in addresses) > 0:
        time.sleep(0.1)
    stats = [_stats(a) for a in addresses]
    assert sum(s.running for s in stats) == 0 and sum(s.kv_blocks_used for s in stats) == 0


def _stats(address: str) -> pb.WorkerStats:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.WorkerStub(ch).Stats(pb.StatsRequest(), timeout=5, metadata=worker_metadata())


def test_seed_routes(fleet):
    h = fleet.headers
    r = httpx.post(f"{fleet.url}/v1/chat/{MODEL}", content="Name a color.", headers=h, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text.strip()
    with httpx.stream(
        "POST",
        fleet.url + "/coordinator/infer",
        headers=h,
        timeout=60,
        json={"prompt": "Hi", "model": MODEL, "max_tokens": 5},
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    # the first token alone, then the worker's groups (--stream-interval: 4 on CPU unless told, 1 on CUDA)
    assert 2 <= len(events) <= 5 and events[-1]["finished"] and not any(e["finished"] for e in events[:-1])
    assert all(e["token"] for e in events[:-1]) and "".join(e["token"] for e in events).strip()
    r = httpx.post(fleet.url + "/coordinator/infer", headers=h, json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(
        fleet.url + "/v1/requests",
        headers=h,
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert r.status_code == 202
    rid = r.json()["request_id"]
    deadline = time.monotonic() + 60
    job = {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{fleet.url}/v1/requests/{rid}", headers=h).json()
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(0.1)
    assert job["status"] == "completed" and job["result"]["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{fleet.url}/v1/requests/nope", headers=h).status_code == 404


def test_killed_idle_worker_leaves_ready(fleet):
    proc, _ = fleet.add_worker("doomed")
    fleet.wait_workers(3)
    proc.popen.kill()  # SIGKILL: no deregistration, only missed heartbeats tell
    killed = time.monotonic()
    names = ["doomed"]
    while "doomed" in names and time.monotonic() - killed < 15:
        time.sleep(0.2)
        body = fleet.ready()
        names = [w["name"] for w in body["models"][MODEL]["workers"]]
    assert "doomed" not in names  # gone (heartbeat timeout 3 s), while the others stay ready
    assert body["ready"] and body["models"][MODEL]["healthy_workers"] == 2


def test_cli_generate_from_a_gateway(fleet):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve",
            "generate",
            "What is the capital of France? One word.",
            "--url",
            fleet.url,
            "--api-key",
            KEY,
            "--max-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout and "tokens, finish:" in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fleetserve", "generate", "hi", "--url", fleet.url, "--api-key", "wrong"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "401" in bad.stderr


def test_example_client_runs(fleet):
    example = Path(__file__).resolve().parents[2] / "examples" / "example_client.py"
    run = subprocess.run(
        [sys.executable, str(example), fleet.url],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, FLEETSERVE_API_KEY=KEY),
    )
    assert run.returncode == 0, run.stderr
    assert "streamed:" in run.stdout and "completion_tokens=" in run.stdout
