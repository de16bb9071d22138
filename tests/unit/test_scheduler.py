"""Scheduler on hand-built requests and a hand-made runner output (no model)."""

from fleetserve.contract import SamplingParams
from fleetserve.engine.request import Request, RequestStatus
from fleetserve.engine.scheduler import SampledToken
from tests.helpers import EOS, make_request, make_scheduler


def run_step(sched, token: int = 7):
    """Schedule, then pretend the runner sampled ``token`` for every sequence that reached its end."""
    plan = sched.schedule()
    sampled = {s.request.request_id: SampledToken(token) for s in plan.seqs if s.samples}
    return plan, sched.update(plan, sampled)


def test_prompt_then_decode_one_token_per_step():
    sched = make_scheduler(budget=32)
    sched.add(make_request("a", 10, max_tokens=3))
    plan, outs = run_step(sched)
    assert [(s.start, s.num_tokens) for s in plan.seqs] == [(0, 10)]
    assert outs[0].new_token_ids == [7] and outs[0].num_output_tokens == 1
    plan, outs = run_step(sched)
    assert [(s.start, s.num_tokens) for s in plan.seqs] == [(10, 1)]
    plan, outs = run_step(sched)
    assert outs[0].finish_reason == "length" and outs[0].num_output_tokens == 3
    assert not sched.has_unfinished()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_token_budget_chunks_prefill_and_decodes_go_first():
    sched = make_scheduler(budget=8, block_size=4)
    sched.add(make_request("a", 3, max_tokens=5))
    run_step(sched)  # a: prompt done, 1 token out
    sched.add(make_request("b", 20, max_tokens=2))
    plan, _ = run_step(sched)
    assert [(s.request.request_id, s.num_tokens) for s in plan.seqs] == [("a", 1), ("b", 7)]
    assert not plan.seqs[1].samples  # a chunk that does not reach the prompt's end samples nothing
    plan, _ = run_step(sched)
    assert [(s.request.request_id, s.start, s.num_tokens) for s in plan.seqs] == [("a", 4, 1), ("b", 7, 7)]
    assert plan.num_tokens <= 8


def test_max_num_seqs_limits_running():
    sched = make_scheduler(budget=100, max_seqs=2)
    for i in range(4):
        sched.add(make_request(f"r{i}", 5, max_tokens=4))
    plan, _ = run_step(sched)
    assert len(plan.seqs) == 2 and sched.num_waiting == 2


def test_priority_then_arrival_order():
    sched = make_scheduler(budget=5, max_seqs=1)
    sched.add(make_request("late-urgent", 5, priority=-1))
    sched.add(make_request("first", 5))
    sched.add(make_request("urgent", 5, priority=-1))
    plan, _ = run_step(sched)
    assert plan.seqs[0].request.request_id == "late-urgent"


def test_eos_stops_but_not_before_min_tokens_or_with_ignore_eos():
    sched = make_scheduler()
    sched.add(make_request("a", 4, max_tokens=10))
    sched.add(make_request("b", 4, max_tokens=10, min_tokens=2))
    sched.add(make_request("c", 4, max_tokens=3, ignore_eos=True))
    _, outs = run_step(sched, token=EOS)
    by_id = {o.request_id: o for o in outs}
    assert by_id["a"].finish_reason == "stop"
    assert by_id["b"].finish_reason is None and by_id["c"].finish_reason is None
    _, outs = run_step(sched, token=EOS)
    by_id = {o.request_id: o for o in outs}
    assert by_id["b"].finish_reason == "stop" and by_id["c"].finish_reason is None


def test_stop_token_ids_finish_with_stop():
    sched = make_scheduler()
    sched.add(make_request("a", 4, max_tokens=10, stop_token_ids=[7]))
    _, outs = run_step(sched, token=7)
    assert outs[0].finish_reason == "stop"


def test_preemption_frees_newest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences of 8-token prompts growing to 14 tokens cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, prefix_caching=False)
    sched.add(make_request("old", 8, max_tokens=6))
    sched.add(make_request("new", 8, max_tokens=6))
    preempted = []
    finished = {}
    for _ in range(40):
        if not sched.has_unfinished():
            break
        plan, outs = run_step(sched)
        preempted += plan.preempted
        finished.update({o.request_id: o for o in outs if o.finished})
    assert preempted and set(preempted) == {"new"}
    assert sched.requests == {} and set(finished) == {"old", "new"}
    assert all(o.num_output_tokens == 6 for o in finished.values())
    assert sched.kv.num_free_blocks == 6


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_seqs=1)
    sched.add(make_request("run", 6, max_tokens=50))
    sched.add(make_request("wait", 6, max_tokens=50))
    run_step(sched)
    out = sched.abort("wait")
    assert out.finish_reason == "abort"
    out = sched.abort("run")
    assert out.finish_reason == "abort"
    assert sched.abort("run") is None
    assert not sched.has_unfinished()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_abort_between_schedule_and_update_is_ignored():
    sched = make_scheduler()
    sched.add(make_request("a", 4, max_tokens=5))
    plan = sched.schedule()
    sched.abort("a")
    assert sched.update(plan, {"a": SampledToken(7)}) == []


def test_prefix_cache_hit_is_counted_and_skips_tokens():
    sched = make_scheduler(block_size=4, budget=64)
    a = make_request("a", 12, max_tokens=1)
    sched.add(a)
    run_step(sched)
    b = Request("b", a.prompt_token_ids + [5], SamplingParams(max_tokens=1))  # 13 tokens: 3 full blocks shared
    sched.add(b)
    plan, _ = run_step(sched)
    assert plan.seqs[0].start == 12 and plan.seqs[0].num_tokens == 1
    assert b.num_cached_tokens == 12


def test_retained_kv_stays_until_released():
    sched = make_scheduler()
    r = make_request("a", 5, max_tokens=1)
    r.retain_kv = True
    sched.add(r)
    _, outs = run_step(sched)
    assert outs[0].finished and r.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.has("a")
    sched.release("a")
    assert not sched.kv.has("a") and sched.kv.num_free_blocks == sched.kv.num_blocks


# -- speculative decoding ------------------------------------------------------------------------------


def repeating_request(rid: str, max_tokens: int = 20, **params) -> Request:
    # ... 1 2 3 4 5 1 2 3: the proposer copies "4 5 1 2" after the suffix
    return Request(rid, [9, 1, 2, 3, 4, 5, 1, 2, 3], SamplingParams(max_tokens=max_tokens, **params))


def prefill(sched, token: int = 4):
    """Run the prompt (in chunks as the budget allows) until its first token, ``token``."""
    while True:
        plan = sched.schedule()
        if sched.update(plan, {s.request.request_id: SampledToken(token) for s in plan.seqs if s.samples}):
            return


def test_decode_carries_a_draft_within_budget_and_blocks():
    sched = make_scheduler(budget=4, speculative_tokens=4)
    sched.add(repeating_request("a"))
    prefill(sched)  # context: 9 1 2 3 4 5 1 2 3 | 4
    plan = sched.schedule(speculate=True)
    (seq,) = plan.seqs
    assert seq.draft == [5, 1, 2]  # 3 of 4 drafts: the budget holds 4 tokens
    assert (seq.start, seq.num_tokens, seq.samples) == (9, 4, True)
    assert seq.token_ids == [4, 5, 1, 2]
    assert len(seq.block_table) * 4 >= 13  # slots for every draft position
    # without speculate (a pipeline's head) the same state plans a plain decode
    assert sched.schedule().seqs[0].draft == []


def test_update_keeps_accepted_tokens_and_commits_only_them():
    sched = make_scheduler(budget=16, speculative_tokens=4)
    sched.add(repeating_request("a"))
    prefill(sched)
    plan = sched.schedule(speculate=True)
    assert plan.seqs[0].draft == [5, 1, 2, 3]
    # two draft tokens kept (5, 1), the third corrected to 7
    (out,) = sched.update(plan, {"a": [SampledToken(5), SampledToken(1), SampledToken(7)]})
    r = sched.requests["a"]
    assert out.new_token_ids == [5, 1, 7] and r.output_token_ids == [4, 5, 1, 7]
    assert r.num_computed_tokens == 12 and r.num_tokens == 13  # the input and two kept drafts were computed
    assert len(sched.kv._hashes["a"]) * sched.kv.block_size <= r.num_computed_tokens


def test_a_stop_token_inside_the_accepted_run_truncates_it():
    sched = make_scheduler(budget=16, speculative_tokens=4)
    sched.add(repeating_request("a", stop_token_ids=[1]))
    prefill(sched)
    plan = sched.schedule(speculate=True)
    (out,) = sched.update(plan, {"a": [SampledToken(5), SampledToken(1), SampledToken(2), SampledToken(3)]})
    assert out.new_token_ids == [5, 1] and out.finish_reason == "stop" and out.num_output_tokens == 3
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_drafts_never_reach_past_max_tokens():
    sched = make_scheduler(budget=16, speculative_tokens=4)
    sched.add(repeating_request("a", max_tokens=3))
    prefill(sched)
    plan = sched.schedule(speculate=True)
    assert plan.seqs[0].draft == [5]  # one token emitted, two left: the input's pick plus one draft
    (out,) = sched.update(plan, {"a": [SampledToken(5), SampledToken(6)]})
    assert out.new_token_ids == [5, 6] and out.finish_reason == "length"


def test_opted_out_request_gets_no_draft():
    sched = make_scheduler(budget=16, speculative_tokens=4)
    sched.add(repeating_request("a", speculative=False))
    prefill(sched)
    assert sched.schedule(speculate=True).seqs[0].draft == []


def test_retained_kv_gives_back_the_slots_of_rejected_drafts():
    sched = make_scheduler(budget=16, speculative_tokens=4)
    request = repeating_request("a", max_tokens=8)
    request.retain_kv = True
    sched.add(request)
    prefill(sched)  # 10 tokens, 9 computed: 3 blocks
    plan = sched.schedule(speculate=True)  # 4 drafts: slots up to 14, 4 blocks
    assert len(sched.kv.block_table("a")) == 4
    (out,) = sched.update(plan, {"a": [SampledToken(EOS)]})  # the first pick ends it: nothing kept
    assert out.finish_reason == "stop"
    assert sched.requests["a"].num_computed_tokens == 10
    assert len(sched.kv.block_table("a")) == 3
