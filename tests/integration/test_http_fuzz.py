"""Property-based fuzzing of the whole HTTP API against a real gateway and worker: schemathesis generates requests
from the gateway's own OpenAPI document (valid ones and ones that break it), seeded so that every run sends the
same cases. No answer may be a 5xx, and every 4xx must have OpenAI's error body.

Then a plain-Python mutation fuzz (seeded too) sends what a schema-driven generator does not: deep nesting, lone
surrogates, huge numbers, NaN, broken bytes and headers.
"""

from __future__ import annotations

import contextlib
import json
import random
import time

import httpx
import pytest

from tests.fleet import start_fleet

pytestmark = pytest.mark.slow

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402

MODEL = "smollm2-135m-instruct"
KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 10
"""Per operation and mode (valid, invalid): the operations with parameters or bodies get up to 2 x 10 cases each
(fewer where a strategy runs dry sooner); those without any give one case each (every case is the
same request)."""
MAX_TOKENS = 3
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def fleet(model_dir):
    # A long prompt's prefill on one busy core may delay heartbeats; a dead worker is not what this test is about.
    f = start_fleet(1, KEY, 30.0, "--default-max-tokens", str(MAX_TOKENS))
    yield f
    f.stop()


def error_shape_problem(status: int, body: bytes) -> str | None:
    """Why a 4xx body is not OpenAI's error shape, or None when it is."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an error object: {body[:200]!r}"
    if (
        not isinstance(error, dict)
        or not isinstance(error.get("message"), str)
        or not isinstance(error.get("type"), str)
    ):
        return f"{status} with a malformed error object: {body[:200]!r}"
    return None


def short_generations(case, positive: bool) -> None:
    """Keep generations short and aimed at the served model: valid cases name it (so they reach a worker),
    and no case asks for more than MAX_TOKENS tokens."""
    body = case.body
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > MAX_TOKENS:
                body[field] = MAX_TOKENS
        if positive and isinstance(body.get("model"), str):
            body["model"] = MODEL
    if positive and case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = MODEL


def run_cases(strategy, on_case) -> None:
    """Draw EXAMPLES_PER_OPERATION cases from ``strategy``, seeded (derandomized), and hand each to ``on_case``;
    an operation with nothing to break (no parameters, no body) has no invalid cases."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        on_case(case)

    with contextlib.suppress(Unsatisfiable):
        run()


def test_no_generated_request_gets_a_5xx_and_every_4xx_has_an_error_body(fleet):
    auth = {"Authorization": f"Bearer {KEY}"}
    document = httpx.get(fleet.url + "/openapi.json", headers=auth, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    # The admin routes answer every request of this fleet (API keys, no admin key) with the same 403 before reading
    # it: the guard's tests cover them, and fuzzing them would only repeat that refusal hundreds of times.
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.startswith("/admin")]
    assert len(operations) >= 10, [op.label for op in operations]
    problems: list[str] = []
    statuses: dict[int, int] = {}
    began = time.monotonic()

    def check(case, mode) -> None:
        positive = mode == schemathesis.GenerationMode.POSITIVE
        short_generations(case, positive)
        response = case.call(base_url=fleet.url, headers=auth, timeout=TIMEOUT_S)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        where = f"{case.method} {case.formatted_path} ({mode.value}) body={str(case.body)[:200]}"
        if response.status_code >= 500:
            body = json.dumps(case.body, ensure_ascii=True) if case.body is not None else ""
            logs = "\n".join(fleet.gateway.lines[-40:] + [w.lines[-20:] for w in fleet.workers][0])
            problems.append(f"{where}: {response.status_code} {response.content[:300]!r}\n{body[:3000]}\n{logs}")
        elif response.status_code >= 400 and (problem := error_shape_problem(response.status_code, response.content)):
            problems.append(f"{where}: {problem}")

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run_cases(operation.as_strategy(mode), lambda case, mode=mode: check(case, mode))
    took = time.monotonic() - began
    cases = sum(statuses.values())
    print(f"\nschemathesis: {cases} cases over {len(operations)} operations in {took:.0f} s; statuses {statuses}")
    assert problems == [], "\n".join(problems[:20])
    assert cases >= 110
    assert any(200 <= s < 300 for s in statuses), "no generated request succeeded"


def mutations(rng: random.Random) -> list[tuple[bytes, dict[str, str]]]:
    """Bodies and headers a schema-driven generator does not send."""
    valid = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
    raw = json.dumps(valid)
    json_type = {"Content-Type": "application/json"}
    out = [
        (b"[" * 100_000 + b"]" * 100_000, json_type),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, json_type),
        (raw.replace('"hi"', '"\\ud800"').encode(), json_type),
        (raw.replace('"hi"', '"\\udc00x\\ud83d"').encode(), json_type),
        (raw.replace(f"{MAX_TOKENS}", "1" * 5000).encode(), json_type),
        (raw.replace(f"{MAX_TOKENS}", "NaN").encode(), json_type),
        (raw.replace(f"{MAX_TOKENS}", "1e999").encode(), json_type),
        (b"\xff\xfe\x00", json_type),
        (raw.encode(), {"Content-Type": "application/x-www-form-urlencoded"}),
        (raw.encode(), {**json_type, "X-Request-Id": "\u00e9t\u00e9".encode("latin-1")}),
        (raw.encode(), {**json_type, "X-Request-Id": "x" * 10_000}),
    ]
    for _ in range(150):  # random byte flips, cuts and insertions of the valid body
        data = bytearray(raw.encode())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[at] = rng.randrange(256)
            elif choice < 0.7:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.choice([b"[", b"{", b'"\\ud800"', b"-1", b"99999999999999999999", b"null", b","])
        out.append((bytes(data), json_type))
    return out


def test_mutated_bodies_and_headers_get_4xx_with_error_bodies(fleet):
    rng = random.Random(20240601)
    problems = []
    routes = ("/v1/chat/completions", "/v1/completions", "/v1/requests", "/coordinator/infer")
    with httpx.Client(timeout=TIMEOUT_S) as client:
        for body, headers in mutations(rng):
            route = rng.choice(routes)
            headers = {"Authorization": f"Bearer {KEY}", **headers}
            try:
                r = client.post(fleet.url + route, content=body, headers=headers)
            except httpx.TransportError as exc:
                problems.append(f"{route} {body[:80]!r}: the connection failed: {exc!r}")
                continue
            if r.status_code >= 500:
                problems.append(f"{route} {body[:80]!r}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400 and (problem := error_shape_problem(r.status_code, r.content)):
                problems.append(f"{route} {body[:80]!r}: {problem}")
    assert problems == [], "\n".join(problems[:20])
