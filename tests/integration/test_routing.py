"""Routing in a real fleet: the model registry from a file, and prefix-aware routing fed by the block hashes
workers report in their heartbeats."""

import json
import time

import httpx
import pytest

from tests.fleet import start_fleet

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SYSTEM = (
    "You are the help desk of a library. Opening hours are nine to five on weekdays and ten to two on Saturdays. "
    "Books can be borrowed for three weeks and renewed twice online. Late returns cost ten cents a day. "
    "Members may reserve up to five titles. The reading room is quiet; phones must be silent. "
) * 2


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("models") / "model_configs.json"
    settings = {"version": "test-v1", "max_tokens": 5, "temperature": 0, "policy": {"name": "prefix-aware"}}
    models.write_text(json.dumps({MODEL: settings}))  # the model_configs.json shape
    f = start_fleet(2, "", 3.0, "--models", str(models))
    yield f
    f.stop()


def chat(fleet, question: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}
    r = httpx.post(fleet.url + "/v1/chat/completions", json={**body, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def workers_of(fleet, completion: dict) -> list[str]:
    trace = httpx.get(f"{fleet.url}/v1/requests/{completion['id']}/trace", timeout=10).json()
    return [a["worker"] for a in trace["attempts"]]


def routing(fleet) -> dict:
    return httpx.get(fleet.url + "/admin/routing", timeout=10).json()


def test_models_come_from_the_registry_file_with_their_defaults(fleet):
    data = httpx.get(fleet.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    info = data[0]["fleetserve"]
    assert info["version"] == "test-v1" and info["configured"] and info["healthy_workers"] == 2
    assert info["architecture"] and info["num_layers"] == 30 and info["context_length"] > 0  # learned from workers
    answer = chat(fleet, "When do you open?", ignore_eos=True)
    assert answer["usage"]["completion_tokens"] == 5  # the model's default max_tokens


def test_same_prefix_goes_where_it_is_cached_and_predictions_match(fleet):
    first = chat(fleet, "Can I renew a book?", max_tokens=2)
    [holder] = workers_of(fleet, first)
    # Wait for the holder's heartbeat to report the prefix's blocks.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reported = {w["name"]: w["cached_blocks_reported"] for w in routing(fleet)["workers"]}
        if reported[holder] >= len(SYSTEM) // 4 // 16:
            break
        time.sleep(0.2)
    for question in ("How long can I keep a book?", "What does a late return cost?", "Can I reserve titles?"):
        answer = chat(fleet, question, max_tokens=2)
        assert workers_of(fleet, answer) == [holder]
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    counters = routing(fleet)["policies"][MODEL]
    assert counters["name"] == "prefix-aware" and counters["cache_hits"] >= 3
    assert counters["predicted_cached_tokens_total"] > 0
    # The prediction is block-exact: the worker found what the gateway expected it to.
    assert counters["actual_cached_tokens_total"] >= counters["predicted_cached_tokens_total"] * 0.9


def test_cold_prompts_are_spread_over_both_workers(fleet):
    seen = set()
    for i in range(6):  # shorter than one KV block: nothing to match, so the least loaded worker, in turn
        body = {"model": MODEL, "prompt": f"{i} {'zebra ' * 3}{i}", "max_tokens": 1}
        r = httpx.post(fleet.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        seen.update(workers_of(fleet, r.json()))
    assert len(seen) == 2


def test_a_streamed_request_keeps_its_id_and_its_trace_has_the_spans_in_order(fleet):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "stream": True,
    }
    with httpx.stream(
        "POST", fleet.url + "/v1/chat/completions", json=body, headers={"X-Request-Id": "trace-me-1"}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-1"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    trace = httpx.get(fleet.url + "/v1/requests/trace-me-1/trace", timeout=10).json()
    spans = trace["spans"]
    names = [s["name"] for s in spans]
    order = ["receive", "preprocess", "queue", "prefill", "first_token", "decode", "postprocess", "finish"]
    assert [n for n in names if n in order] == order, names
    assert names.count("dispatch") == 1
    assert all(s["duration"] >= 0 and s["start"] >= 0 for s in spans)
    starts = [s["start"] for s in spans]
    assert starts == sorted(starts)
    dispatch = next(s for s in spans if s["name"] == "dispatch")
    assert dispatch["attributes"]["outcome"] == "finished" and dispatch["attributes"]["tokens"] >= 1
    # A reused X-Request-Id does not collide on the worker: both requests run.
    for _ in range(2):
        again = httpx.post(
            fleet.url + "/v1/chat/completions",
            json={**body, "stream": False},
            headers={"X-Request-Id": "trace-me-1"},
            timeout=60,
        )
        assert again.status_code == 200
