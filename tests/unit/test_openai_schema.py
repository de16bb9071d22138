"""OpenAI request schemas: bodies as the ``openai`` client sends them, every rejection, and SamplingParams mapping."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from fleetserve.contract import SamplingParams
from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.api.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ContextLengthExceededError,
    parse_request,
    stop_strings,
    to_sampling_params,
)

MESSAGES = [{"role": "user", "content": "Hi"}]


def sent_body(call: str, **kwargs: Any) -> dict[str, Any]:
    """The JSON body the official client sends for ``client.<call>(**kwargs)`` (captured, never sent)."""
    captured: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        captured.update(json.loads(request.content))
        return httpx.Response(400, json={"error": {"message": "captured", "type": "x", "param": None, "code": None}})

    client = openai.OpenAI(
        api_key="k",
        base_url="http://test/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    endpoint = client.chat.completions if call == "chat" else client.completions
    with pytest.raises(openai.BadRequestError):
        endpoint.create(**kwargs)
    return captured


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **fields})


def comp(**fields: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", **fields})


def rejected(cls: type, body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(cls, body)
    return info.value


def chat_rejected(**fields: Any) -> InvalidRequestError:
    return rejected(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **fields})


def comp_rejected(**fields: Any) -> InvalidRequestError:
    return rejected(CompletionRequest, {"model": "m", "prompt": "Hi", **fields})


# ---------------------------------------------------------------- bodies from the openai client


def test_chat_body_from_openai_client():
    body = sent_body(
        "chat",
        model="qwen",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi!", "name": "bot"},
            {"role": "user", "content": "Bye"},
        ],
        max_completion_tokens=50,
        max_tokens=10,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["\n\n", "END"],
        presence_penalty=0.1,
        frequency_penalty=0.2,
        logprobs=True,
        top_logprobs=3,
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        user="u1",
        extra_body={
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 2,
            "speculative": False,
            "priority": -3,
            "some_future_field": {"x": 1},
        },
    )
    req = parse_request(ChatCompletionRequest, body)
    assert req.model == "qwen"
    assert req.message_dicts() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": "Hi!", "name": "bot"},
        {"role": "user", "content": "Bye"},
    ]
    assert req.stream and req.include_usage and req.priority == -3 and req.user == "u1"
    assert stop_strings(req) == ["\n\n", "END"]
    params = to_sampling_params(req, default_max_tokens=1024, prompt_len=20, max_model_len=4096)
    assert params == SamplingParams(
        max_tokens=50,  # max_completion_tokens wins over max_tokens
        min_tokens=2,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        seed=7,
        ignore_eos=True,
        logprobs=3,
        speculative=False,
    )


def test_minimal_chat_body_gets_openai_defaults():
    req = parse_request(ChatCompletionRequest, sent_body("chat", model="m", messages=MESSAGES))
    assert not req.stream and not req.include_usage and req.priority == 0
    assert stop_strings(req) == []
    params = to_sampling_params(req, default_max_tokens=256, prompt_len=10, max_model_len=4096)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0 and params.min_p == 0.0
    assert params.logprobs is None and params.seed is None and params.max_tokens == 256
    assert params.presence_penalty == params.frequency_penalty == 0.0 and params.repetition_penalty == 1.0


def test_completion_bodies_from_openai_client():
    body = sent_body("completions", model="m", prompt="Once upon", max_tokens=5, logprobs=2, stop="\n", echo=False)
    req = parse_request(CompletionRequest, body)
    assert req.prompt == "Once upon" and stop_strings(req) == ["\n"]
    params = to_sampling_params(req, default_max_tokens=100, prompt_len=3, max_model_len=64)
    assert params.max_tokens == 5 and params.logprobs == 2 and params.temperature == 1.0
    assert parse_request(CompletionRequest, sent_body("completions", model="m", prompt=[1, 2, 3])).prompt == [1, 2, 3]
    assert parse_request(CompletionRequest, sent_body("completions", model="m", prompt=["one"])).prompt == "one"
    assert parse_request(CompletionRequest, sent_body("completions", model="m", prompt=[[4, 5]])).prompt == [4, 5]


def test_stream_options_without_usage_and_without_stream():
    assert not chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert not chat(stream=False, stream_options={"include_usage": True}).include_usage
    assert chat(stream=True, stream_options={"include_usage": True, "include_obfuscation": False}).include_usage


def test_nulls_mean_not_given_and_extras_are_ignored():
    fields = ["temperature", "top_p", "top_k", "min_p", "seed", "stop", "max_tokens", "n", "logprobs", "stream"]
    req = chat(**{f: None for f in fields}, priority=None, tool_choice="none", metadata={"a": "b"}, store=False)
    assert req.priority == 0
    params = to_sampling_params(req, 16, 4, 100)
    assert params.temperature == 1.0 and params.max_tokens == 16
    assert comp(suffix=None, echo=None, best_of=1, logit_bias={}).prompt == "Hi"


def test_ints_are_accepted_for_floats_and_top_logprobs_zero():
    params = to_sampling_params(chat(temperature=0, top_p=1, logprobs=True), 8, 4, 100)
    assert params.temperature == 0.0 and isinstance(params.temperature, float) and params.greedy
    assert params.logprobs == 0
    assert to_sampling_params(chat(logprobs=False), 8, 4, 100).logprobs is None


def test_stop_strings_deduplicated_in_order():
    assert stop_strings(comp(stop=["b", "a", "b"])) == ["b", "a"]


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"n": 0}, "n"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": {"a": 1}}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"seed": "1"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream_options": []}, "stream_options"),
        ({"user": 5}, "user"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"priority": 2**31}, "priority"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {
                "messages": [
                    MESSAGES[0],
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        ],
                    },
                ]
            },
            "messages[1].content[1].type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": ["plain"]}]}, "messages[0].content[0]"),
    ],
)
def test_chat_rejections_name_the_param(fields: dict[str, Any], param: str):
    err = chat_rejected(**fields)
    assert err.param == param
    assert f"'{param}'" in str(err)


def test_missing_fields():
    err = rejected(ChatCompletionRequest, {"messages": MESSAGES})
    assert err.param == "model" and str(err) == "Missing required parameter: 'model'."
    assert rejected(ChatCompletionRequest, {"model": "m"}).param == "messages"
    assert rejected(CompletionRequest, {"model": "m"}).param == "prompt"


def test_body_must_be_an_object():
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_request(ChatCompletionRequest, [1, 2])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"prompt": ["one", "two"]}, "prompt", "only one prompt"),
        ({"prompt": [[1], [2]]}, "prompt", "only one prompt"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[]]}, "prompt", "empty"),
        ({"prompt": [1, "a"]}, "prompt", "prompt[1]"),
        ({"prompt": [1, True]}, "prompt", "prompt[1]"),
        ({"prompt": [1, -2]}, "prompt", ">= 0"),
        ({"prompt": [[1, -2]]}, "prompt", "prompt[0][1]"),
        ({"prompt": None}, "prompt", "string"),
        ({"prompt": 5}, "prompt", "string"),
        ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"logprobs": True}, "logprobs", "integer"),
        ({"echo": True}, "echo", "echo"),
        ({"best_of": 2}, "best_of", "best_of"),
        ({"suffix": "tail"}, "suffix", "suffix"),
        ({"n": 3}, "n", "n=1"),
        ({"stop": ["\n", ""]}, "stop", "empty"),
    ],
)
def test_completion_rejections(fields: dict[str, Any], param: str, words: str):
    err = comp_rejected(**fields)
    assert err.param == param
    assert words in str(err)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ],
)
def test_out_of_range_values_are_rejected_by_sampling_params(fields: dict[str, Any], param: str):
    for req in (chat(**fields), comp(**fields)):
        with pytest.raises(InvalidRequestError) as info:
            to_sampling_params(req, 100, 5, 1000)
        assert info.value.param == param


# ---------------------------------------------------------------- context window


def test_context_overflow_message_with_counts():
    with pytest.raises(ContextLengthExceededError) as info:
        to_sampling_params(chat(max_tokens=1000), 512, prompt_len=8000, max_model_len=8192)
    err = info.value
    assert isinstance(err, InvalidRequestError)
    assert str(err) == (
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "(8000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion."
    )
    assert err.param == "max_tokens" and err.code == "context_length_exceeded"
    err = pytest.raises(
        ContextLengthExceededError, to_sampling_params, chat(max_completion_tokens=300), 512, 8000, 8192
    )
    assert err.value.param == "max_completion_tokens"
    err = pytest.raises(ContextLengthExceededError, to_sampling_params, comp(max_tokens=10), 512, 100, 105)
    assert "(100 in the prompt, 10 in the completion)" in str(err.value) and err.value.param == "max_tokens"


def test_prompt_alone_too_long():
    err = pytest.raises(ContextLengthExceededError, to_sampling_params, chat(), 512, 8192, 8192).value
    assert err.param == "messages"
    assert str(err) == (
        "This model's maximum context length is 8192 tokens. However, your messages resulted in 8192 tokens. "
        "Please reduce the length of the messages."
    )
    err = pytest.raises(ContextLengthExceededError, to_sampling_params, comp(max_tokens=5), 512, 9000, 8192).value
    assert err.param == "prompt" and "you requested 9005 tokens (9000 in the prompt, 5 in the completion)" in str(err)


def test_default_max_tokens_is_what_the_window_leaves_capped():
    assert to_sampling_params(chat(), 1024, prompt_len=100, max_model_len=8192).max_tokens == 1024
    assert to_sampling_params(chat(), 1024, prompt_len=8000, max_model_len=8192).max_tokens == 192
    assert to_sampling_params(comp(), 1024, prompt_len=8191, max_model_len=8192).max_tokens == 1
    assert to_sampling_params(comp(max_tokens=92), 16, prompt_len=8100, max_model_len=8192).max_tokens == 92


def test_empty_prompt_is_rejected():
    err = pytest.raises(InvalidRequestError, to_sampling_params, comp(prompt=""), 16, 0, 100).value
    assert err.param == "prompt"
    assert pytest.raises(InvalidRequestError, to_sampling_params, chat(), 16, 0, 100).value.param == "messages"
