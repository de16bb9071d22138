"""The default model on its own 4-bit codes: the engine loads int4 layers, stays within 2% of float32's perplexity
on the shipped held-out text, serves prefix-cache hits and chunked prefills, and gives a request the same tokens
alone as in a batch (the int4 and int8 kernels compute each row on its own)."""

import pytest
import torch

from fleetserve.bench.quality import DEFAULT_TEXT, negative_log_likelihood
from fleetserve.contract import SamplingParams
from fleetserve.engine.models.quantized import Int4Linear, Int8Embedding, Int8Linear, int4_kernels_work
from fleetserve.engine.weight_format import cpu_has_bf16

pytestmark = pytest.mark.skipif(not int4_kernels_work(), reason="this PyTorch has no CPU int4/int8 kernels")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def int4_engine(make_engine):
    return make_engine(dtype="int4", budget=24, prefix_caching=True)


def test_int4_engine_runs_on_the_files_codes(int4_engine):
    model = int4_engine.runner.model
    assert int4_engine.runner.weight_format.name == "int4"
    assert all(isinstance(layer.gate_up, Int4Linear) and isinstance(layer.qkv, Int4Linear) for layer in model.layers)
    assert isinstance(model.embed, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    # the KV cache in bfloat16 where the CPU has bfloat16 units (half the bytes a decode step reads)
    assert int4_engine.runner.kv_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert int4_engine.runner.kv_caches[0].dtype == int4_engine.runner.kv_dtype
    weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert weight_bytes < 150 * 2**20  # float32 would be 540 MB


def test_int4_perplexity_is_within_two_percent_of_float32(int4_engine, engine, tokenizer):
    ids = tokenizer.encode(DEFAULT_TEXT.read_text(encoding="utf-8"))[:192]
    nll32, n = negative_log_likelihood(engine, ids, 192)  # the shared float32 engine
    nll4, n4 = negative_log_likelihood(int4_engine, ids, 192)
    assert n == n4 == 191
    assert nll4 / n4 < nll32 / n + 0.02  # mean nats per token: under 2% more perplexity


def test_int4_serves_chunked_prefills_and_prefix_hits_and_is_batch_invariant(int4_engine, chat_prompts):
    prompts = chat_prompts[:2]
    alone = [int4_engine.generate([p], GREEDY)[0] for p in prompts]  # prompts of ~40 tokens in chunks of 24
    together = int4_engine.generate(prompts, GREEDY)  # their prefixes are cached by now
    assert together == alone
    assert all(len(out) == GREEDY.max_tokens for out in alone)
    assert not int4_engine.has_unfinished()


def test_a_worker_left_to_auto_serves_int4_and_the_gateway_shows_it():
    import httpx

    from tests.fleet import start_fleet

    fleet = start_fleet(1, worker_env={"FLEETSERVE_DTYPE": None})  # the default: --dtype auto
    try:
        model = httpx.get(fleet.url + "/v1/models", timeout=10).json()["data"][0]["fleetserve"]
        assert model["dtype"] == "int4" and model["quantized"] is True
        body = {"model": model.get("name", "smollm2-135m-instruct"), "max_tokens": 8, "temperature": 0}
        body["messages"] = [{"role": "user", "content": "Name a colour."}]
        resp = httpx.post(fleet.url + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8
    finally:
        fleet.stop()


def test_small_steps_run_on_their_own_thread_count(make_engine, chat_prompts, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        engine = make_engine(num_threads=2, small_step_threads=1)
        seen = []
        forward = engine.runner.model.forward

        def watch(inputs, *args):
            seen.append((inputs.shape[0], torch.get_num_threads()))
            return forward(inputs, *args)

        monkeypatch.setattr(engine.runner.model, "forward", watch)
        engine.generate([chat_prompts[0]], GREEDY)
        assert seen[0] == (len(chat_prompts[0]), 2)  # the prompt: every thread
        assert set(seen[1:]) == {(1, 1)}  # its decodes: one
    finally:
        torch.set_num_threads(before)
