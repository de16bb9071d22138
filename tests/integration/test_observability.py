"""Metrics, traces and the response cache through a real gateway and worker."""

import json
import re
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from tests.fleet import READY_WORKER, start_fleet, worker_channel

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def fleet(model_dir):
    f = start_fleet(0, "", 3.0, "--response-cache", "memory")
    proc, address = f.add_worker("observed", "--metrics-port", "0")
    f.wait_workers(1)
    f.worker_address = address
    f.worker_metrics = re.search(r"metrics (http://\S+)", proc.wait_for(READY_WORKER).string).group(1)
    yield f
    f.stop()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(fleet) -> dict[tuple, float]:
    return samples(httpx.get(fleet.url + "/metrics", timeout=10).text)


def worker_steps(fleet) -> int:
    async def stats():
        async with worker_channel(fleet.worker_address) as ch:
            return await pb_grpc.WorkerStub(ch).Stats(pb.StatsRequest())

    import asyncio

    return asyncio.run(stats()).steps


def ask(fleet, content: str, headers=None, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}
    return httpx.post(fleet.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=60)


def test_counters_and_histograms_move_by_the_number_of_requests(fleet):
    before = scrape(fleet)
    n = 3
    for i in range(n):
        assert ask(fleet, f"Count {i}", temperature=0.7).status_code == 200  # sampled: never cached
    after = scrape(fleet)
    ok = ("fleetserve_requests_total", (("model", MODEL), ("outcome", "ok")))
    assert after[ok] - before.get(ok, 0) == n
    ttft = ("fleetserve_time_to_first_token_seconds_count", (("model", MODEL),))
    assert after[ttft] - before.get(ttft, 0) == n
    gen = ("fleetserve_generation_tokens_total", (("model", MODEL),))
    assert after[gen] - before.get(gen, 0) >= n
    # Per-worker gauges from heartbeats.
    state = ("fleetserve_worker_state", (("model", MODEL), ("state", "healthy"), ("worker", "observed")))
    assert after[state] == 1
    assert ("fleetserve_worker_kv_cache_usage_ratio", (("model", MODEL), ("worker", "observed"))) in after
    # The worker's own page.
    worker_page = samples(urllib.request.urlopen(fleet.worker_metrics + "", timeout=10).read().decode())
    assert worker_page[("fleetserve_engine_requests_total", (("outcome", "ok"),))] >= n


def test_second_identical_greedy_request_is_a_cache_hit_no_worker_sees(fleet):
    first = ask(fleet, "Name a fruit.", temperature=0)
    assert first.status_code == 200
    steps = worker_steps(fleet)
    hits = scrape(fleet).get(("fleetserve_response_cache_hits_total", (("model", MODEL),)), 0)
    second = ask(fleet, "Name a fruit.", temperature=0)
    assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert worker_steps(fleet) == steps  # no worker saw it
    assert scrape(fleet)[("fleetserve_response_cache_hits_total", (("model", MODEL),))] == hits + 1
    trace = httpx.get(f"{fleet.url}/v1/requests/{second.headers['x-request-id']}/trace", timeout=10).json()
    lookup = next(s for s in trace["spans"] if s["name"] == "cache_lookup")
    assert lookup["attributes"]["hit"] is True and not trace["attempts"]
    # Streamed, the hit arrives as a normal stream with the same text.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8,
            "temperature": 0, "stream": True}  # fmt: skip
    text = ""
    with httpx.stream("POST", fleet.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == first.json()["choices"][0]["message"]["content"]
    assert worker_steps(fleet) == steps
    # Cache-Control: no-cache goes to the worker.
    again = ask(fleet, "Name a fruit.", headers={"Cache-Control": "no-cache"}, temperature=0)
    assert again.status_code == 200 and worker_steps(fleet) > steps


def test_sampled_requests_without_a_seed_are_never_cached_but_seeded_ones_are(fleet):
    for _ in range(2):
        steps = worker_steps(fleet)
        assert ask(fleet, "Pick a colour.", temperature=0.9).status_code == 200
        assert worker_steps(fleet) > steps
    ask(fleet, "Pick a number.", temperature=0.9, seed=5)
    steps = worker_steps(fleet)
    assert ask(fleet, "Pick a number.", temperature=0.9, seed=5).status_code == 200
    assert worker_steps(fleet) == steps
