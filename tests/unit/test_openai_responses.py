"""OpenAI response bodies: shapes checked with the ``openai`` client's own models, SSE framing, error mapping."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import httpx
import openai
import pytest
from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fleetserve.contract import TokenLogprob
from fleetserve.errors import CapacityError, InvalidRequestError, UnknownModelError, UnsupportedModelError
from fleetserve.gateway.api.responses import (
    SSE_DONE,
    ChatStream,
    CompletionStream,
    chat_completion,
    completion,
    error_body,
    error_for,
    new_chat_id,
    new_completion_id,
    sse,
)
from fleetserve.gateway.api.schema import ContextLengthExceededError

VOCAB = {1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "é", 6: "!"}


def token_text(token_id: int) -> str:
    return VOCAB.get(token_id, f"<{token_id}>")


@dataclass
class Usage:
    prompt_tokens: int = 7
    completion_tokens: int = 4
    cached_tokens: int = 3


def lp(token_id: int, logprob: float, *top: tuple[int, float]) -> TokenLogprob:
    return TokenLogprob(token_id, logprob, list(top))


LOGPROBS = [
    lp(1, -0.1, (1, -0.1), (3, -2.5), (4, -3.0)),
    lp(2, -0.2, (2, -0.2), (6, -1.9), (2, -4.0)),
    lp(3, -0.3, (3, -0.3), (5, float("-inf"))),
    lp(4, -0.4),
]


class CompletionChunkModel(Completion):
    """A streamed completions chunk: OpenAI sends finish_reason null until the end (the SDK's type says str)."""

    class Choice(CompletionChoice):
        finish_reason: Literal["stop", "length", "content_filter"] | None = None  # type: ignore[assignment]

    choices: list[Choice]  # type: ignore[assignment]


def client_for(payload: bytes, content_type: str) -> openai.OpenAI:
    """A client whose every call is answered with ``payload``."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload, headers={"content-type": content_type})

    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        api_key="k", base_url="http://t/v1", max_retries=0, http_client=httpx.Client(transport=transport)
    )


# ---------------------------------------------------------------- non-streamed


def test_chat_completion_shape():
    body = chat_completion("m", "chatcmpl-abc", "Hello, world", "stop", Usage(), created=1700000000)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion" and parsed.created == 1700000000 and parsed.model == "m"
    choice = parsed.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.content == "Hello, world"
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert parsed.usage.prompt_tokens_details.cached_tokens == 3
    assert body["system_fingerprint"] is None
    assert isinstance(body["created"], int)


def test_chat_completion_with_logprobs():
    body = chat_completion(
        "m",
        "chatcmpl-x",
        "Hello, wor",
        "length",
        Usage(),
        logprobs=2,
        token_logprobs=LOGPROBS[:3],
        token_text=token_text,
        system_fingerprint="fp_1",
    )
    parsed = ChatCompletion.model_validate(body)
    assert parsed.system_fingerprint == "fp_1" and parsed.choices[0].finish_reason == "length"
    content = parsed.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", ",", " wor"]
    assert [c.logprob for c in content] == [-0.1, -0.2, -0.3]
    assert content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hello", -0.1), (" wor", -2.5)]
    assert content[2].top_logprobs[1].logprob == -9999.0  # -inf is not JSON
    assert body["choices"][0]["logprobs"]["content"][2]["top_logprobs"][1]["bytes"] == list("é".encode())
    json.dumps(body, allow_nan=False)


def test_chat_logprobs_with_zero_alternatives():
    body = chat_completion(
        "m", "c", "Hi", "stop", Usage(), logprobs=0, token_logprobs=LOGPROBS[:1], token_text=token_text
    )
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["top_logprobs"] == [] and entry["token"] == "Hello"


def test_completion_shape_and_logprobs():
    body = completion(
        "m",
        "cmpl-1",
        "Hello, world",
        "stop",
        Usage(),
        created=5,
        logprobs=2,
        token_logprobs=LOGPROBS,
        token_text=token_text,
    )
    parsed = Completion.model_validate(body)
    assert parsed.object == "text_completion" and parsed.choices[0].text == "Hello, world"
    assert parsed.usage.total_tokens == 11
    logprobs = parsed.choices[0].logprobs
    assert logprobs.tokens == ["Hello", ",", " wor", "ld"]
    assert logprobs.token_logprobs == [-0.1, -0.2, -0.3, -0.4]
    assert logprobs.text_offset == [0, 5, 6, 10]
    assert logprobs.top_logprobs == [
        {"Hello": -0.1, " wor": -2.5},
        {",": -0.2, "!": -1.9},
        {" wor": -0.3, "é": -9999.0},
        {},
    ]


def test_completion_without_logprobs():
    body = completion("m", "cmpl-1", "x", "length", Usage())
    assert body["choices"][0]["logprobs"] is None
    assert Completion.model_validate(body).choices[0].finish_reason == "length"


def test_only_stop_and_length_are_sent():
    with pytest.raises(ValueError):
        chat_completion("m", "c", "", "abort", Usage())
    with pytest.raises(ValueError):
        CompletionStream("m", "c").final("abort", Usage())


def test_logprobs_need_token_text():
    with pytest.raises(ValueError):
        ChatStream("m", "c", logprobs=1)
    with pytest.raises(ValueError):
        completion("m", "c", "", "stop", Usage(), logprobs=1)


def test_ids():
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", new_chat_id())
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", new_completion_id())
    assert new_chat_id() != new_chat_id()


# ---------------------------------------------------------------- streamed chat


def test_chat_stream_with_usage():
    stream = ChatStream("m", "chatcmpl-s", created=11, include_usage=True)
    first = stream.first_chunk()
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream.delta("") is None
    chunks = [first, stream.delta("Hel"), stream.delta("lo"), *stream.final("length", Usage())]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all(p.id == "chatcmpl-s" and p.created == 11 and p.object == "chat.completion.chunk" for p in parsed)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert "".join(p.choices[0].delta.content or "" for p in parsed[:-1]) == "Hello"
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and parsed[-1].usage.completion_tokens == 4
    with pytest.raises(RuntimeError):
        stream.delta("late")


def test_chat_stream_without_usage():
    stream = ChatStream("m", "chatcmpl-s")
    chunks = [stream.first_chunk(), stream.delta("Hi"), *stream.final("stop")]
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)


def test_chat_stream_logprobs():
    stream = ChatStream("m", "c", logprobs=1, token_text=token_text)
    chunk = stream.delta("Hello", LOGPROBS[:1])
    content = ChatCompletionChunk.model_validate(chunk).choices[0].logprobs.content
    assert [(c.token, len(c.top_logprobs)) for c in content] == [("Hello", 1)]
    # tokens whose text is not out yet (held back) still carry their logprobs
    held = stream.delta("", LOGPROBS[1:2])
    assert held is not None and held["choices"][0]["delta"] == {"content": ""}
    assert ChatStream("m", "c").delta("", LOGPROBS[:1]) is None  # not requested: nothing to send
    assert ChatStream("m", "c").delta("x", LOGPROBS[:1])["choices"][0]["logprobs"] is None


def test_chat_stream_through_the_openai_client():
    stream = ChatStream("m", "chatcmpl-e2e", include_usage=True, logprobs=0, token_text=token_text)
    events = [stream.first_chunk(), stream.delta("Hello", LOGPROBS[:1]), stream.delta(", wörld ✓")]
    events += stream.final("stop", Usage())
    payload = b"".join(sse(e) for e in events) + SSE_DONE
    client = client_for(payload, "text/event-stream")
    received = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True))
    assert len(received) == len(events)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Hello, wörld ✓"
    assert received[1].choices[0].logprobs.content[0].token == "Hello"
    assert received[-2].choices[0].finish_reason == "stop"
    assert received[-1].usage.total_tokens == 11 and received[-1].choices == []


def test_chat_completion_through_the_openai_client():
    body = chat_completion("m", "chatcmpl-1", "Hi there", "stop", Usage())
    client = client_for(json.dumps(body).encode(), "application/json")
    result = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "Hi there" and result.usage.prompt_tokens == 7


# ---------------------------------------------------------------- streamed completions


def test_completion_stream_with_usage_and_offsets():
    stream = CompletionStream("m", "cmpl-s", created=3, include_usage=True, logprobs=1, token_text=token_text)
    chunks = [
        stream.delta("Hello", LOGPROBS[:1]),
        stream.delta(", wor", LOGPROBS[1:3]),
        stream.delta("ld", LOGPROBS[3:]),
    ]
    chunks += stream.final("stop", Usage())
    for c in chunks[:-1]:
        CompletionChunkModel.model_validate(c)
        assert c["usage"] is None and c["object"] == "text_completion"
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[:3]] == [[0], [5, 6], [10]]
    assert chunks[1]["choices"][0]["logprobs"]["top_logprobs"] == [{",": -0.2}, {" wor": -0.3}]
    final = Completion.model_validate(chunks[-2])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].text == ""
    assert chunks[-1]["choices"] == [] and Completion.model_validate(chunks[-1]).usage.completion_tokens == 4


def test_completion_stream_without_usage():
    stream = CompletionStream("m", "cmpl-s")
    assert stream.delta("") is None
    chunks = [stream.delta("a"), *stream.final("length")]
    assert len(chunks) == 2 and all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0] == {"index": 0, "text": "a", "logprobs": None, "finish_reason": None}


def test_completion_stream_through_the_openai_client():
    stream = CompletionStream("m", "cmpl-e2e", include_usage=True)
    events = [stream.delta("Once"), stream.delta(" upon"), *stream.final("length", Usage())]
    client = client_for(b"".join(sse(e) for e in events) + SSE_DONE, "text/event-stream")
    received = list(client.completions.create(model="m", prompt="x", stream=True))
    assert "".join(c.choices[0].text for c in received if c.choices) == "Once upon"
    assert received[-2].choices[0].finish_reason == "length" and received[-1].usage.prompt_tokens == 7


# ---------------------------------------------------------------- SSE and errors


def test_sse_format():
    assert sse({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()
    assert sse("[DONE]") == SSE_DONE == b"data: [DONE]\n\n"
    chunk = ChatStream("m", "c").delta("line1\nline2")
    frame = sse(chunk)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    assert json.loads(frame[6:]) == chunk


def test_error_body():
    assert error_body("bad", "invalid_request_error", "n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


def test_error_for_each_type():
    status, body = error_for(InvalidRequestError("n must be 1", "n"))
    assert status == 400 and body["error"] == {
        "message": "n must be 1",
        "type": "invalid_request_error",
        "param": "n",
        "code": None,
    }
    status, body = error_for(ContextLengthExceededError("too long", "messages"))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = error_for(UnknownModelError("The model `x` does not exist."))
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "model_not_found"
    status, body = error_for(CapacityError("queue full"))
    assert status == 503 and body["error"]["type"] == "server_error" and body["error"]["code"] == "overloaded"
    for exc in (RuntimeError("secret path /x/y"), UnsupportedModelError("internal detail"), KeyError("k")):
        status, body = error_for(exc)
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "secret" not in body["error"]["message"] and "detail" not in body["error"]["message"]


def test_error_bodies_are_what_the_openai_client_reads():
    status, body = error_for(InvalidRequestError("Invalid value for 'n': only n=1 is supported, got 2.", "n"))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    client = openai.OpenAI(
        api_key="k",
        base_url="http://t/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    assert info.value.param == "n" and info.value.type == "invalid_request_error"
    assert "only n=1" in info.value.message
