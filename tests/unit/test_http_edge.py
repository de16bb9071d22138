"""The gateway's HTTP edge against a stub state (no workers): hosts, keys, headers, content types, body sizes, bad
JSON shapes, the admin rules, job and trace visibility, error bodies and the OpenAPI document."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from fleetserve.gateway.admission import Admission
from fleetserve.gateway.api.deps import scoped_id
from fleetserve.gateway.api.guard import key_tag
from fleetserve.gateway.app import create_app
from fleetserve.gateway.dispatch import Dispatcher
from fleetserve.gateway.model_policies import ModelPolicies
from fleetserve.gateway.models import ModelRegistry
from fleetserve.gateway.registry import WorkerRegistry
from fleetserve.gateway.state import GatewayState
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.settings.gateway import GatewaySettings

KEY, OTHER, ADMIN = "key-a", "key-b", "admin-k"
MAX_MODEL_LEN = 64


class CountingTokenizer:
    """A tokenizer stub: three tokens for any prompt; counts how often it was asked."""

    calls = 0

    def __len__(self) -> int:
        return 1000

    def encode(self, *args, **kwargs):
        CountingTokenizer.calls += 1
        return [1, 2, 3]

    encode_chat = encode


def make_state(**settings) -> GatewayState:
    models = ModelRegistry()
    registry = WorkerRegistry(1.0, 5.0)
    policies = ModelPolicies(models)
    admission = Admission(registry, policies.policy)
    tokenizers = TokenizerStore()
    tokenizers.tokenizers["m"] = CountingTokenizer()
    tokenizers.max_model_len["m"] = MAX_MODEL_LEN
    return GatewayState(
        registry=registry,
        tokenizers=tokenizers,
        dispatcher=Dispatcher(registry, policies, admission),
        settings=GatewaySettings(**settings),
        models=models,
    )


def client(**settings) -> TestClient:
    return TestClient(create_app(make_state(**settings)), raise_server_exceptions=False)


@pytest.fixture
def keyed() -> TestClient:
    return client(api_key=[KEY, OTHER], admin_key=ADMIN)


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def is_error_body(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code
    return error


def chat(content: str = "hi", **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


# -- body size, content type, hosts ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_by_its_content_length_and_when_chunked():
    c = client(max_body_mb=0.001)
    big = json.dumps(chat("x" * 5000))
    r = c.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    is_error_body(r, 413, "request_too_large")

    def chunks():
        for i in range(0, len(big), 500):
            yield big[i : i + 500].encode()

    r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    is_error_body(r, 413, "request_too_large")


def test_a_body_must_be_json_except_the_plain_text_route():
    c = client()
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        r = c.post("/v1/chat/completions", content=json.dumps(chat()), headers=headers)
        is_error_body(r, 415, "unsupported_media_type")
    r = c.post("/v1/chat/m", content="hello", headers={"Content-Type": "application/x-www-form-urlencoded"})
    is_error_body(r, 415)
    r = c.post("/v1/chat/" + "m" * 300, content="hello", headers={"Content-Type": "text/plain"})
    is_error_body(r, 400)
    r = c.post("/v1/chat/completions", json=chat(), headers={"Sec-Fetch-Site": "cross-site"})
    is_error_body(r, 403)


def test_the_host_allow_list():
    c = client(allowed_hosts=["api.example.com", "*.internal"])
    assert c.get("/health", headers={"Host": "api.example.com:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "gw.internal"}).status_code == 200
    is_error_body(c.get("/health", headers={"Host": "evil.com"}), 400, "invalid_host")
    assert client().get("/health", headers={"Host": "evil.com"}).status_code == 200


# -- keys and the admin API -----------------------------------------------------------------------------------------


def test_the_key_check_uses_the_routed_path_not_the_host_header(keyed):
    for host in ("evil/health?", "x/health#", "a:1/health"):
        r = keyed.get("/v1/models", headers={"Host": host})
        assert r.status_code in (400, 401), (host, r.status_code)
        r = keyed.get("/admin/workers", headers={"Host": host})
        assert r.status_code in (400, 401), (host, r.status_code)
    assert keyed.get("/v1/models", headers=auth()).status_code == 200


def test_bad_authorization_and_request_id_headers_are_400(keyed):
    for headers in (
        {"Authorization": "Bearer \xe9t\xe9".encode("latin-1")},
        {"Authorization": "Bearer " + "k" * 2000},
        {**auth(), "X-Request-Id": "caf\xe9".encode("latin-1")},
        {**auth(), "X-Request-Id": "r" * 129},
    ):
        is_error_body(keyed.post("/v1/chat/completions", json=chat(), headers=headers), 400, "invalid_header")


def test_admin_needs_the_admin_key_and_is_refused_without_one_when_api_keys_are_set(keyed):
    is_error_body(keyed.get("/admin/workers", headers=auth()), 401, "invalid_api_key")
    assert keyed.get("/admin/workers", headers=auth(ADMIN)).status_code == 200
    no_admin = client(api_key=[KEY])
    error = is_error_body(no_admin.get("/admin/workers", headers=auth()), 403)
    assert "--admin-key" in error["message"]
    open_gateway = client()
    assert open_gateway.get("/admin/workers").status_code == 200
    error = is_error_body(open_gateway.post("/admin/workers", json={"model": "m"}), 403)
    assert "--admin-key" in error["message"]


# -- bad JSON shapes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"model": "m", "messages": ' + "[" * 40 + "]" * 40 + "}",
        '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"model": "\\udfff", "messages": []}',
        '{"\\ud800": 1}',
        '{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
        '{"model": "m", "max_tokens": ' + "9" * 5000 + "}",
        "\xff\xfe",
    ],
)
def test_bad_json_shapes_are_400(keyed, raw):
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/requests", "/coordinator/infer"):
        r = keyed.post(
            route, content=raw.encode("utf-8", "surrogatepass"), headers={**auth(), "Content-Type": "application/json"}
        )
        is_error_body(r, 400)


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 2**31},
        {"top_k": -2},
        {"seed": 2**64},
        {"seed": -1},
        {"stop_token_ids": [2**32]},
        {"stop_token_ids": [-1]},
        {"n": 2**40},
        {"max_tokens": 2**40},
        {"min_tokens": 2**40},
        {"priority": 2**31},
        {"temperature": 1e300},
        {"logprobs": True, "top_logprobs": 2**32},
        {"model": "m" * 257},
    ],
)
def test_out_of_range_values_are_400(keyed, extra):
    is_error_body(keyed.post("/v1/chat/completions", json=chat(**extra), headers=auth()), 400)


@pytest.mark.parametrize("prompt", [[2**32], [-1], [2**70], [[5, 2**32]], [1000], list(range(MAX_MODEL_LEN))])
def test_token_id_prompts_out_of_range_are_400(keyed, prompt):
    r = keyed.post("/v1/completions", json={"model": "m", "prompt": prompt}, headers=auth())
    is_error_body(r, 400)


def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing(keyed):
    long = "x" * (16 * MAX_MODEL_LEN + 1)
    calls = CountingTokenizer.calls
    error = is_error_body(keyed.post("/v1/chat/completions", json=chat(long), headers=auth()), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    r = keyed.post("/v1/completions", json={"model": "m", "prompt": long}, headers=auth())
    assert is_error_body(r, 400)["param"] == "prompt"
    assert CountingTokenizer.calls == calls


# -- jobs, traces, errors -------------------------------------------------------------------------------------------


def test_jobs_and_traces_are_visible_only_to_their_key_and_the_admin_key(keyed):
    state: GatewayState = keyed.app.state.fleet
    key = scoped_id(key_tag(KEY), "mine")
    asyncio.run(state.jobs.save(key, {"request_id": "mine", "status": "completed"}))
    state.owner_tags.add(key_tag(KEY))
    trace = state.traces.start(key, "m")
    attempt = trace.begin_attempt("worker-0", "10.0.0.7:5001", 0, 0.0)
    trace.end_attempt(attempt, "retried", "UNAVAILABLE: ipv4:10.0.0.7:5001 refused")
    assert keyed.get("/v1/requests/mine", headers=auth()).json()["status"] == "completed"
    is_error_body(keyed.get("/v1/requests/mine", headers=auth(OTHER)), 404)
    is_error_body(keyed.get("/v1/requests/mine/trace", headers=auth(OTHER)), 404)
    assert keyed.get("/v1/requests/mine", headers=auth(ADMIN)).status_code == 200
    shown = keyed.get("/v1/requests/mine/trace", headers=auth()).json()
    assert shown["request_id"] == "mine" and shown["attempts"][0]["worker"] == "worker-0"
    assert "10.0.0.7" not in json.dumps(shown) and "UNAVAILABLE" not in json.dumps(shown)
    admin_view = keyed.get("/v1/requests/mine/trace", headers=auth(ADMIN)).json()
    assert admin_view["attempts"][0]["address"] == "10.0.0.7:5001"


def test_every_4xx_of_the_framework_has_an_openai_body(keyed):
    is_error_body(keyed.get("/nowhere", headers=auth()), 404)
    is_error_body(keyed.get("/v1/chat/completions", headers=auth()), 405)
    is_error_body(keyed.delete("/v1/models", headers=auth()), 405)


def test_a_worker_failure_is_a_502_without_its_address_or_grpc_detail():
    from fleetserve.errors import UpstreamError
    from fleetserve.gateway.api.deps import error_payload

    status, body = error_payload(UpstreamError("worker w failed: UNAVAILABLE: ipv4:10.1.2.3:50051 (after 4 attempts)"))
    assert status == 502 and body["error"]["code"] == "worker_failed"
    assert "10.1.2.3" not in body["error"]["message"] and "UNAVAILABLE" not in body["error"]["message"]


def test_the_openapi_document_describes_the_request_bodies_and_errors(keyed):
    doc = keyed.get("/openapi.json", headers=auth()).json()
    schemas = doc["components"]["schemas"]
    post = doc["paths"]["/v1/chat/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["maxLength"] == 256
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "/coordinator/infer" in doc["paths"] and "/admin/workers" in doc["paths"]
    assert "text/plain" in doc["paths"]["/v1/chat/{model}"]["post"]["requestBody"]["content"]
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
