"""Sampler on hand-made logits: greedy, filters, penalties, seeds, min_tokens and log-probabilities."""

import math

import pytest
import torch

from fleetserve.contract import SamplingParams
from fleetserve.engine.request import Request
from fleetserve.engine.sampling import Sampler
from fleetserve.errors import InvalidRequestError

V = 10


def req(rid="r", prompt=(1, 2), output=(), seed=None, **params):
    r = Request(rid, list(prompt), SamplingParams(max_tokens=50, seed=seed, **params))
    for t in output:
        r.append_token(t)
    if seed is not None:
        r.generator = torch.Generator().manual_seed(seed)
    return r


def logits_row(values):
    return torch.tensor([values], dtype=torch.float32)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0] + [0.0] * 7, [5.0] + [0.0] * 9])
    out = Sampler(V, {9})(logits, [req("a"), req("b")])
    assert out.token_ids == [1, 0]
    assert out.logprobs == [None, None]


def test_top_k_one_equals_greedy_at_any_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    s = Sampler(V, set(), seed=3)
    out = s(logits, [req(str(i), temperature=5.0, top_k=1) for i in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    # probabilities ~ [0.5, 0.3, 0.2, ~0...]: top_p 0.6 keeps tokens 0 and 1 only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 7]))
    s = Sampler(V, set(), seed=1)
    seen = {s(logits, [req(temperature=1.0, top_p=0.6)]).token_ids[0] for _ in range(200)}
    assert seen == {0, 1}


def test_min_p_cuts_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.4, 0.1] + [1e-9] * 7]))
    s = Sampler(V, set(), seed=1)
    seen = {s(logits, [req(temperature=1.0, min_p=0.5)]).token_ids[0] for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1] + [0.0] * 7)
    logits = torch.log(probs.clamp_min(1e-12)).unsqueeze(0).repeat(2000, 1)
    out = Sampler(V, set(), seed=5)(logits, [req(str(i), temperature=1.0) for i in range(2000)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=V).float() / 2000
    assert abs(freq[0] - 0.7) < 0.05 and abs(freq[1] - 0.2) < 0.05 and freq[3:].sum() == 0


def test_same_seed_same_tokens_regardless_of_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    alone = [Sampler(V, set(), seed=s)(logits[1:2], [req(seed=42, temperature=1.0)]).token_ids[0] for s in (0, 1)]
    r = req("x", seed=42, temperature=1.0)
    batched = Sampler(V, set(), seed=7)(logits, [req("a", temperature=1.0), r, req("c", temperature=1.0)])
    assert alone[0] == alone[1] == batched.token_ids[1]
    # a sequence of draws is reproducible too
    seqs = []
    for _ in range(2):
        r = req("x", seed=42, temperature=1.0)
        seqs.append([Sampler(V, set())(logits[1:2], [r]).token_ids[0] for _ in range(20)])
    assert seqs[0] == seqs[1] and len(set(seqs[0])) > 1


def test_repetition_penalty_hf_semantics():
    logits = logits_row([2.0, -2.0, 1.9] + [0.0] * 7)
    # token 0 (seen, positive logit) is divided; token 1 (seen, negative) multiplied
    out = Sampler(V, set())(logits, [req(prompt=[0, 1], repetition_penalty=2.0)])
    assert out.token_ids == [2]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = logits_row([3.0, 2.5] + [0.0] * 8)
    s = Sampler(V, set())
    assert s(logits, [req(prompt=[0, 0], output=[], frequency_penalty=1.0)]).token_ids == [0]
    assert s(logits, [req(output=[0], frequency_penalty=1.0)]).token_ids == [1]
    assert s(logits, [req(output=[0], presence_penalty=1.0)]).token_ids == [1]
    assert s(logits, [req(output=[0], presence_penalty=0.4)]).token_ids == [0]


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = logits_row([0.0, 0.0, 9.0, 8.0, 7.0] + [0.0] * 5)
    s = Sampler(V, {2})
    assert s(logits, [req(min_tokens=1, stop_token_ids=[3])]).token_ids == [4]
    assert s(logits, [req(output=[5], min_tokens=1)]).token_ids == [2]


def test_logprobs_of_sampled_and_top_alternatives():
    logits = logits_row([1.0, 3.0, 2.0] + [-5.0] * 7)
    out = Sampler(V, set())(logits, [req(logprobs=2), req("b")])
    lp = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 1 and math.isclose(lp.logprob, expected[1].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [1, 2]
    assert out.logprobs[1] is None


def test_mixed_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 9.0] + [0.0] * 8] * 2)
    out = Sampler(V, set(), seed=0)(logits, [req("g"), req("s", temperature=0.5, top_k=1)])
    assert out.token_ids == [1, 1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("logprobs", 21),
        ("min_tokens", 99),
        ("stop_token_ids", [-1]),
        ("temperature", float("nan")),
    ],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.param == field
    assert field in str(err.value)


# -- verifying draft tokens ------------------------------------------------------------------------------


def test_verify_greedy_keeps_the_draft_while_it_equals_argmax():
    logits = torch.full((4, V), 0.0)
    logits[0, 3] = logits[1, 4] = logits[2, 6] = logits[3, 1] = 5.0
    s = Sampler(V, set())
    assert s.verify(logits, req(), [3, 4, 5]).token_ids == [3, 4, 6]  # the third draft token is corrected
    assert s.verify(logits, req(), [3, 4, 6]).token_ids == [3, 4, 6, 1]  # all kept, plus a bonus token
    assert s.verify(logits, req(), [2, 4, 6]).token_ids == [3]


def test_verify_penalties_see_the_draft_tokens_kept_before_each_row():
    # token 3 leads every row by a little; once emitted, a frequency penalty pushes it below token 5
    logits = torch.zeros(2, V)
    logits[:, 3], logits[:, 5] = 2.0, 1.5
    r = req(frequency_penalty=1.0)
    result = Sampler(V, set()).verify(logits, r, [3])
    assert result.token_ids == [3, 5]
    # the same as decoding one token at a time
    plain = Sampler(V, set())
    first = plain(logits[:1], [r]).token_ids[0]
    r.append_token(first)
    assert [first, plain(logits[1:], [r]).token_ids[0]] == [3, 5]


def test_verify_respects_min_tokens_row_by_row():
    logits = torch.zeros(2, V)
    logits[:, 9], logits[:, 4] = 5.0, 1.0  # EOS leads both rows, then 4
    r = req(min_tokens=2, output=(4,))  # one more token before EOS may come
    assert Sampler(V, {9}).verify(logits, r, [4]).token_ids == [4, 9]


def test_verify_sampled_distribution_is_plain_sampling():
    """Rejection sampling against a point-mass draft emits what plain sampling would, in distribution: the first
    token ~ p0 (the draft kept with probability p0(t)), and after a kept draft the bonus token ~ p1."""
    p0 = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02, 0.0, 0.0, 0.0])
    p1 = torch.tensor([0.05, 0.05, 0.10, 0.50, 0.20, 0.10, 0.0, 0.0, 0.0, 0.0])
    temperature = 0.7
    logits = torch.stack([p.clamp_min(1e-12).log() * temperature for p in (p0, p1)])  # softmax(l / T) == p
    draft = [0]
    s = Sampler(V, set(), seed=11)
    n = 4000
    first, bonus = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        tokens = s.verify(logits, req(temperature=temperature), draft).token_ids
        assert len(tokens) == 1 + (tokens[0] == draft[0])
        first[tokens[0]] += 1
        if len(tokens) == 2:
            bonus[tokens[1]] += 1
    kept = int(bonus.sum())
    # standard errors are at most 0.008 (first) and 0.013 (bonus, ~1600 draws); a draft always kept, never kept,
    # or a correction that may repeat the rejected token is off by 0.15 or more
    assert (first / n - p0).abs().max() < 0.035
    assert (bonus / kept - p1).abs().max() < 0.05
    assert abs(kept / n - p0[0]) < 0.035


def test_verify_seeded_equals_plain_seeded_decoding():
    """A seeded request picks the very tokens plain decoding picks, drawing as much noise as it emits."""
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    r_plain = req(seed=5, temperature=1.0)
    plain = Sampler(V, set())
    picks = []
    for row in range(4):
        picks.append(plain(logits[row : row + 1], [r_plain]).token_ids[0])
        r_plain.append_token(picks[-1])
    r_spec = req(seed=5, temperature=1.0)
    draft = picks[:2] + [(picks[2] + 1) % V]  # two right guesses, then a wrong one
    assert Sampler(V, set()).verify(logits, r_spec, draft).token_ids == picks[:3]
    # the generators are in the same state: the next draws agree
    assert torch.equal(r_spec.generator.get_state(), _state_after(seed=5, draws=3))


def _state_after(seed: int, draws: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    for _ in range(draws):
        torch.empty(V).exponential_(generator=g)
    return g.get_state()
