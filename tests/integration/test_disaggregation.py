"""Prefill/decode disaggregation and conversation sessions on real processes.

One fleet for the module (the tests run in order): a whole-model replica gives the reference texts and leaves; a
prefill worker and a decode worker then serve every request together (the first token from the prefill worker,
the rest from the decode worker after it fetched the prompt's KV). Texts equal the replica's, greedy and seeded,
alone and 16 at once, with a 1,500-token prompt too; a prefix the decode worker caches is not sent again;
sessions keep a conversation's KV on the decode worker between turns; a transfer cut by a stopped or killed
prefill worker still completes the request, and no KV block stays used on either side.
"""

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.chat import MODEL, chat_body, complete, trace
from tests.fleet import start_fleet
from tests.helpers import PROMPTS

pytestmark = pytest.mark.slow

QUESTIONS = PROMPTS  # 8 distinct prompts
BIG = ("--kv-cache-mb", "160", "--threads", "2")
SESSIONS = ("--session-ttl", "4", "--session-max-tokens", "3000")
KV_TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M in float32: layers x (key, value) x kv heads x head dim x 4
REF: dict[str, list[str]] = {}


def long_text(topic: str, sentences: int = 100) -> str:
    """Numbered sentences on ``topic`` (100 make about 1,550 tokens); prompts on two topics share only the opening."""
    return " ".join(f"Note {i} about {topic}: it matters for reason number {i * 7 % 13}." for i in range(sentences))


LONG = {
    "tides": long_text("tides") + " Summarize the notes in one sentence.",
    "tides-again": long_text("tides") + " Which note is the most surprising?",
    "bees": long_text("bees", 40) + " Summarize the notes in one sentence.",  # about 600 tokens
    "glass": long_text("glass", 40) + " Summarize the notes in one sentence.",
}


@pytest.fixture(scope="module")
def fleet():
    fleet = start_fleet(0, "", 3.0)
    fleet.add_worker("replica", *BIG)
    fleet.wait_workers(1)
    yield fleet
    fleet.stop()


def workers(fleet) -> dict[str, dict]:
    listed = httpx.get(fleet.url + "/admin/workers", timeout=10).json()["workers"]
    return {w["name"]: w for w in listed if w["state"] != "dead"}


def wait_until(check, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def spans(fleet, request_id: str) -> tuple[dict, list[dict]]:
    t = trace(fleet.url, request_id)
    return {s["name"]: s.get("attributes", {}) for s in t["spans"]}, t["attempts"]


def test_reference_from_a_replica(fleet):
    seeded = [chat_body(q, seed=5 + i) for i, q in enumerate(QUESTIONS[:2])]
    long = [chat_body(text, max_tokens=16) for text in LONG.values()]
    texts = complete(fleet.url, [chat_body(q) for q in QUESTIONS] + seeded + long)  # 14 at once
    REF["greedy"], REF["seeded"] = texts[:8], texts[8:10]
    REF.update(zip(LONG, texts[10:], strict=True))
    assert len(set(REF["greedy"])) > 4 and all(REF[name] for name in LONG)


def test_prefill_and_decode_workers_give_the_replicas_text(fleet):
    fleet.add_worker("prefill-0", "--role", "prefill", *BIG, *SESSIONS, "--kv-transfer-ttl", "5")
    fleet.add_worker("decode-0", "--role", "decode", *BIG, *SESSIONS, "--kv-fetch-timeout", "3")
    replica = fleet.workers.pop(0)
    assert replica.stop() == 0  # drains and deregisters
    wait_until(lambda: set(workers(fleet)) == {"prefill-0", "decode-0"}, what="the two workers alone")
    roles = {name: w["role"] for name, w in workers(fleet).items()}
    assert roles == {"prefill-0": "prefill", "decode-0": "decode"}
    assert complete(fleet.url, [chat_body(q) for q in QUESTIONS]) == REF["greedy"]  # 8 at once
    seeded = complete(fleet.url, [chat_body(q, seed=5 + i) for i, q in enumerate(QUESTIONS[:2])])
    assert seeded == REF["seeded"]
    resp = httpx.post(fleet.url + "/v1/chat/completions", json=chat_body(QUESTIONS[3]), timeout=60)
    assert resp.json()["choices"][0]["message"]["content"] == REF["greedy"][3]
    named, attempts = spans(fleet, resp.headers["x-request-id"])
    assert [(a["worker"], a["outcome"]) for a in attempts] == [("prefill-0", "prefilled"), ("decode-0", "finished")]
    kv = named["kv_transfer"]
    assert kv["worker"] == "decode-0" and "fallback" not in kv
    assert kv["tokens"] + kv["cached_tokens"] == resp.json()["usage"]["prompt_tokens"]
    assert kv["bytes"] == kv["tokens"] * KV_TOKEN_BYTES


def test_a_long_prompt_and_a_prefix_the_decode_worker_holds(fleet):
    first = httpx.post(fleet.url + "/v1/chat/completions", json=chat_body(LONG["tides"], max_tokens=16), timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == REF["tides"]
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    assert prompt_tokens >= 1500
    kv = spans(fleet, first.headers["x-request-id"])[0]["kv_transfer"]
    assert kv["tokens"] + kv["cached_tokens"] == prompt_tokens and kv["tokens"] > 1400
    assert kv["bytes"] == kv["tokens"] * KV_TOKEN_BYTES
    again = httpx.post(
        fleet.url + "/v1/chat/completions", json=chat_body(LONG["tides-again"], max_tokens=16), timeout=120
    )
    assert again.json()["choices"][0]["message"]["content"] == REF["tides-again"]
    kv = spans(fleet, again.headers["x-request-id"])[0]["kv_transfer"]
    assert kv["cached_tokens"] >= 1300  # the shared notes were on the decode worker already: not sent
    assert kv["bytes"] == kv["tokens"] * KV_TOKEN_BYTES < 200 * KV_TOKEN_BYTES


def chat(fleet, messages: list[dict], session: str, max_tokens: int = 16) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(fleet.url + "/v1/chat/completions", json=body, headers={"X-Session-Id": session}, timeout=120)


def test_a_sessions_second_turn_finds_its_history_cached(fleet):
    history = [{"role": "user", "content": long_text("rivers", 80) + " Which river is longest?"}]
    first = chat(fleet, history, "conv")
    assert first.status_code == 200, first.text
    turn1 = first.json()
    history += [{"role": "assistant", "content": turn1["choices"][0]["message"]["content"]}]
    history += [{"role": "user", "content": "And the shortest?"}]
    second = chat(fleet, history, "conv")
    assert second.status_code == 200, second.text
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= turn1["usage"]["prompt_tokens"] - 16  # the whole first turn, to its last full block
    _, attempts = spans(fleet, second.headers["x-request-id"])
    assert [a["worker"] for a in attempts] == ["decode-0"]  # straight to the worker holding the session
    prompt_tokens = second.json()["usage"]["prompt_tokens"]
    listed = wait_until(  # the second turn's pin (prompt and answer), once a heartbeat tells of it
        lambda: [s for s in sessions(fleet) if s["held"] and s["tokens"] > prompt_tokens],
        what="the second turn's pin in a heartbeat",
    )
    assert [(s["id"], s["worker"], s["turns"]) for s in listed] == [("conv", "decode-0", 2)]
    assert httpx.delete(fleet.url + "/v1/sessions/conv", timeout=10).status_code == 200
    gone = httpx.delete(fleet.url + "/v1/sessions/conv", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "session_id"


def test_session_limits_and_ttl(fleet):
    too_long = chat(fleet, [{"role": "user", "content": LONG["bees"]}], "big", max_tokens=2500)
    assert too_long.status_code == 400 and "at most 3000" in too_long.json()["error"]["message"]
    assert chat(fleet, [{"role": "user", "content": "Hi there"}], "bad id").status_code == 400
    assert chat(fleet, [{"role": "user", "content": QUESTIONS[0]}], "short").status_code == 200
    wait_until(lambda: any(s["id"] == "short" and s["held"] for s in sessions(fleet)), what="the pinned session")
    # After its 4 s TTL the decode worker lets it go: nothing listed as held, no block in use.
    wait_until(lambda: not any(s["held"] for s in sessions(fleet)), what="the TTL")
    wait_until(lambda: workers(fleet)["decode-0"]["kv_blocks_used"] == 0, what="free blocks")


def sessions(fleet) -> list[dict]:
    return httpx.get(fleet.url + "/admin/sessions", timeout=10).json()["sessions"]


def _stream_hurting_prefill(fleet, body: dict, hurt) -> tuple[str, str]:
    """Stream ``body``; call ``hurt()`` as soon as the first token is in. The text and the request id."""

    async def run():
        text, rid = "", ""
        url = fleet.url + "/v1/chat/completions"
        async with (
            httpx.AsyncClient(timeout=120) as client,
            client.stream("POST", url, json={**body, "stream": True}) as r,
        ):
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    if delta and not text:
                        hurt()
                    text += delta
        return text, rid

    return asyncio.run(run())


def test_a_transfer_cut_by_a_stopped_prefill_worker(fleet):
    prefill = fleet.workers[0]  # prefill-0 (the replica left)
    text, rid = _stream_hurting_prefill(
        fleet, chat_body(LONG["bees"], max_tokens=16), lambda: prefill.popen.send_signal(signal.SIGSTOP)
    )
    assert text == REF["bees"]
    kv = spans(fleet, rid)[0]["kv_transfer"]
    assert kv["fallback"]  # the decode worker gave up on the transfer and prefilled the prompt itself
    prefill.popen.send_signal(signal.SIGCONT)
    wait_until(lambda: "prefill-0" in workers(fleet), what="the prefill worker back")
    # The fetch timed out before the stopped worker read it: the KV it kept for it goes with its 5 s TTL.
    wait_until(
        lambda: all(workers(fleet).get(n, {}).get("kv_blocks_used", 1) == 0 for n in ("prefill-0", "decode-0")),
        what="no used blocks on either worker",
    )


def test_a_transfer_cut_by_a_killed_prefill_worker(fleet):
    wait_until(lambda: workers(fleet).get("prefill-0", {}).get("state") == "healthy", what="a healthy prefill worker")
    prefill = fleet.workers[0]
    text, rid = _stream_hurting_prefill(
        fleet, chat_body(LONG["glass"], max_tokens=16), lambda: prefill.popen.send_signal(signal.SIGKILL)
    )
    assert text == REF["glass"]
    kv = spans(fleet, rid)[0]["kv_transfer"]
    assert kv["fallback"]
    wait_until(lambda: workers(fleet).get("decode-0", {}).get("kv_blocks_used", 1) == 0, what="free blocks")
