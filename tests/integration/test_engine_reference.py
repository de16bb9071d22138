"""Greedy output of the engine equals Hugging Face transformers, token for token (fp32, default model)."""

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.reference]


def test_greedy_matches_transformers_generate(engine, hf_reference, chat_prompts):
    from fleetserve.contract import SamplingParams

    assert len(chat_prompts) >= 8 and hf_reference["prompts"] == chat_prompts
    n = hf_reference["new_tokens"]
    # min_tokens masks EOS exactly as min_new_tokens does in transformers
    ours = engine.generate(chat_prompts, SamplingParams(max_tokens=n, min_tokens=n))
    assert ours == hf_reference["greedy"]


def test_first_step_logits_match_transformers(engine, hf_reference, chat_prompts):
    # Beyond the argmax: the whole next-token distribution agrees to float32 rounding.
    from fleetserve.contract import SamplingParams
    from fleetserve.engine.scheduler import SampledToken

    prompt = chat_prompts[0]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=1))
    plan = engine.scheduler.schedule()
    hidden = engine.runner.forward(plan)
    logits, _ = engine.runner.logits(plan, hidden)
    engine.scheduler.update(plan, {rid: SampledToken(0)})
    ref = torch.tensor(hf_reference["first_logits"])
    assert torch.allclose(logits[0], ref, atol=1e-3, rtol=1e-4)
    assert not engine.has_unfinished()
