"""Pipelines of real processes: stage nodes that join and die, a model no single node holds, token-exact output.

One fleet for the module, whose membership changes test by test (the tests run in order): a whole-model replica
gives the reference texts and leaves; stage nodes capped at 400 MiB (the model's float32 weights are 513 MiB) join
one by one: one alone waits for capacity, a node below the minimum is refused, two serve the model, three
re-partition; the middle one is killed with SIGKILL mid-stream, another stops answering (SIGSTOP), a node joins
back. Every served text equals the replica's.
"""

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest

from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.protocol import fleet_pb2_grpc as pb_grpc
from tests.browser import console_page, send_prompt
from tests.chat import chat_body, complete, stream_text
from tests.fleet import READY_WORKER, spawn, start_fleet, worker_channel
from tests.helpers import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
STAGE = ("--role", "stage", "--max-memory-mb", "400", "--max-model-len", "2048", "--max-num-batched-tokens", "64")
QUESTIONS = PROMPTS + [p + " Answer in two sentences." for p in PROMPTS]  # 16 distinct prompts
REF: dict[str, list[str]] = {}


def pipelines(fleet) -> dict:
    answer = httpx.get(fleet.url + "/admin/pipelines", timeout=10).json()
    return {p["model"]: p for p in answer["pipelines"]}


def wait_stages(fleet, count: int, timeout: float = 120) -> dict:
    """Until the model's pipeline serves on ``count`` stages and the gateway routes to it."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    ready: dict = {}
    while time.monotonic() < deadline:
        state = pipelines(fleet).get(MODEL, {})
        serving = len(state.get("stages", [])) == count and state.get("status", "").startswith("serving")
        if serving and (ready := fleet.ready()).get("ready"):
            return state
        time.sleep(0.2)
    logs = "\n".join(line for w in [fleet.gateway, *fleet.workers] for line in w.lines[-30:])
    raise TimeoutError(f"no {count}-stage pipeline: {state}; /ready: {ready}\n{logs}")


def head_stats(fleet, timeout: float = 30) -> dict:
    """The serving head's entry of /admin/workers (waiting while a re-partition has none serving)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(fleet.url + "/admin/workers", timeout=10).json()["workers"]
        heads = [w for w in workers if w.get("role") == "stage" and w.get("serving") and w["state"] != "dead"]
        if len(heads) == 1 or time.monotonic() > deadline:
            assert len(heads) == 1, workers
            return heads[0]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet():
    fleet = start_fleet(1, "", 3.0, "--pipeline-cooldown", "1")
    yield fleet
    fleet.stop()


def test_reference_from_a_whole_model_worker(fleet):
    REF["greedy"] = complete(fleet.url, [chat_body(q) for q in QUESTIONS])
    REF["seeded"] = complete(fleet.url, [chat_body(q, seed=11 + i) for i, q in enumerate(QUESTIONS[:4])])
    assert all(REF["greedy"]) and len(set(REF["greedy"])) > 8
    replica = fleet.workers.pop()
    assert replica.stop() == 0  # drains and deregisters


def test_one_node_below_the_model_waits_for_capacity(fleet):
    fleet.add_worker("stage-a", *STAGE)
    deadline = time.monotonic() + 30
    while "waiting for capacity" not in pipelines(fleet).get(MODEL, {}).get("status", ""):
        assert time.monotonic() < deadline, pipelines(fleet)
        time.sleep(0.2)
    ready = httpx.get(fleet.url + "/ready", timeout=30)
    assert ready.status_code == 503
    assert re.search(r"waiting for capacity: \d+ of 514 MiB placed", ready.text), ready.text
    models = httpx.get(fleet.url + "/v1/models", timeout=10).json()["data"]
    assert "waiting for capacity" in json.dumps(models)


def test_a_node_below_the_minimum_is_refused_with_the_reason(fleet):
    tiny = spawn("worker", "--gateway", fleet.control, "--name", "tiny", "--threads", "1", *STAGE[:1], "stage",
                 "--max-memory-mb", "12", "--max-model-len", "2048")  # fmt: skip
    assert tiny.popen.wait(120) == 3
    assert any("needs at least" in line for line in tiny.lines), tiny.lines[-5:]


def test_two_stages_give_the_single_worker_text(fleet):
    fleet.add_worker("stage-b", *STAGE)
    state = wait_stages(fleet, 2)
    assert state["stages"][0]["layer_start"] == 0 and state["stages"][-1]["layer_end"] == 30
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS[:8]]) == REF["greedy"][:8]
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS]) == REF["greedy"]  # 16 at once
    seeded = complete(fleet.url, [chat_body(q, seed=11 + i) for i, q in enumerate(QUESTIONS[:4])])
    assert seeded == REF["seeded"]
    answer = httpx.post(fleet.url + "/v1/chat/completions", json=chat_body(QUESTIONS[0]), timeout=60)
    again = answer.json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # a prefix hit, across the stages
    assert again["choices"][0]["message"]["content"] == REF["greedy"][0]
    trace = httpx.get(f"{fleet.url}/v1/requests/{answer.headers['x-request-id']}/trace", timeout=10).json()
    spans = {s["name"]: s.get("attributes", {}) for s in trace["spans"]}
    prefill, decode = spans["prefill"]["hops"], spans["decode"]["hops"]
    assert [(h["name"], h["layer_start"], h["layer_end"]) for h in prefill] == [
        (s["name"], s["layer_start"], s["layer_end"]) for s in state["stages"]
    ]
    assert prefill[1]["bytes"] > 0 and all(h["compute_s"] > 0 for h in prefill + decode)
    assert spans["decode"]["steps"] == 15  # 16 tokens: the first comes from the prefill


def test_the_console_timeline_shows_each_stage_hop(fleet):
    stages = [s["name"] for s in pipelines(fleet)[MODEL]["stages"]]
    with console_page(fleet.url) as page:
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        send_prompt(page, QUESTIONS[1], 8)
        for phase in ("prefill", "decode"):
            rows = page.locator(f'#timeline .hop-row[data-phase="{phase}"]')
            rows.nth(len(stages) - 1).wait_for()
            assert [rows.nth(i).get_attribute("data-stage") for i in range(rows.count())] == stages
        assert "over 7 steps" in page.locator('#timeline .hop-row[data-phase="decode"]').first.get_attribute("title")
        page.locator("#timeline").screenshot(path=str(IMG / "console-timeline-hops.png"))


def test_three_stages_after_a_third_node_joins(fleet):
    before = pipelines(fleet)[MODEL]["repartitions"]
    fleet.add_worker("stage-c", *STAGE)
    state = wait_stages(fleet, 3)
    assert state["repartitions"] > before
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS[:8]]) == REF["greedy"][:8]


def _kill_during_streams(fleet, victim, sig: int, count: int = 8) -> list[str]:
    """Stream ``count`` greedy requests; send ``sig`` to ``victim`` once they are under way."""

    async def run():
        progress: list = []
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [
                asyncio.create_task(stream_text(client, fleet.url, chat_body(q), progress)) for q in QUESTIONS[:count]
            ]
            while len(progress) < 3 * count and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            victim.popen.send_signal(sig)
            return await asyncio.gather(*tasks), [p for p in progress if isinstance(p, str)]

    texts, ids = asyncio.run(run())
    if texts != REF["greedy"][:count]:  # say what happened to the requests that differ
        traces = [httpx.get(f"{fleet.url}/v1/requests/{i}/trace", timeout=10).json() for i in ids]
        print(json.dumps(traces, indent=1)[:20000])
        print("\n".join(line for w in fleet.workers for line in w.lines[-40:]))
    return texts


def test_kill_9_the_middle_stage_mid_stream(fleet):
    state = pipelines(fleet)[MODEL]
    middle = state["stages"][1]["name"]
    victim = next(w for w in fleet.workers if f"worker ready: {middle} " in "\n".join(w.lines))
    texts = _kill_during_streams(fleet, victim, signal.SIGKILL)
    assert texts == REF["greedy"][:8]
    state = wait_stages(fleet, 2)
    assert middle not in [s["name"] for s in state["stages"]]
    fleet.workers.remove(victim)


def test_join_back_repartitions_and_stays_exact(fleet):
    before = pipelines(fleet)[MODEL]["repartitions"]
    fleet.add_worker("stage-d", *STAGE)
    state = wait_stages(fleet, 3)
    assert state["repartitions"] > before
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS[:8]]) == REF["greedy"][:8]


def test_a_stage_that_stops_answering_is_replaced_and_no_kv_leaks(fleet):
    state = pipelines(fleet)[MODEL]
    last = state["stages"][-1]["name"]
    victim = next(w for w in fleet.workers if f"worker ready: {last} " in "\n".join(w.lines))
    try:
        texts = _kill_during_streams(fleet, victim, signal.SIGSTOP)
        assert texts == REF["greedy"][:8]
        assert last not in [s["name"] for s in pipelines(fleet)[MODEL]["stages"]]
        deadline = time.monotonic() + 30  # the head's next heartbeats: nothing running, no block held
        while (stats := head_stats(fleet))["kv_blocks_used"] or stats["running"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
    finally:
        victim.popen.send_signal(signal.SIGCONT)
    wait_stages(fleet, 3)  # it heartbeats again, registers again and is taken back


def test_stages_refuse_wrong_models_and_bad_steps(fleet):
    state = pipelines(fleet)[MODEL]
    later = state["stages"][-1]
    workers = httpx.get(fleet.url + "/admin/workers", timeout=10).json()["workers"]
    address = next(w["address"] for w in workers if w["name"] == later["name"] and w["state"] != "dead")

    async def run():
        async with worker_channel(address) as channel:
            stub = pb_grpc.StageStub(channel)
            wrong = await stub.Assign(pb.StageAssignment(weights_fingerprint="0" * 32, layer_start=1, layer_end=2))
            assert not wrong.ok and "fingerprint" in wrong.detail
            layers = await stub.Assign(pb.StageAssignment(num_layers=31, layer_start=1, layer_end=2))
            assert not layers.ok and "30 layers" in layers.detail
            route = [pb.StageRoute(address=address, name=later["name"], layer_start=later["layer_start"])]
            route[0].layer_end = later["layer_end"]
            opening = pb.StageOpen(num_layers=30, route=route, weights_fingerprint="0" * 32)
            call = stub.Forward(iter([pb.StageMessage(open=opening)]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "other weights" in err.value.details()

    asyncio.run(run())
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS[:2]]) == REF["greedy"][:2]


def test_a_worker_ready_line_names_the_stage(fleet):
    assert all(READY_WORKER.search("\n".join(w.lines)) for w in fleet.workers)
