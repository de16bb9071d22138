"""Continuous batching: which sequences run this step, how many tokens each, and when a sequence is done.

One token-budget model, no prefill or decode phase: every sequence has ``num_computed_tokens`` catching up
with its token count. Running sequences go first (a decode is one token, an unfinished prompt a chunk), then
waiting ones take what budget is left. When blocks run out, the newest running sequence is preempted: its
blocks are freed and it waits again, to be recomputed later.

With speculation on, a decode may bring draft tokens guessed from its own context (``NgramProposer``): the step
computes them after its next input token, as a short chunk, and the sequence advances by as many tokens as the
runner accepted (``update``); the KV written for rejected ones lies past the computed tokens and is overwritten.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from fleetserve.config import SchedulerConfig
from fleetserve.contract import RequestOutput, TokenLogprob
from fleetserve.engine.kv_cache import KVCacheManager
from fleetserve.engine.ngram import NgramProposer
from fleetserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step."""

    request: Request
    start: int
    """Position of the first token computed this step (== its num_computed_tokens before the step)."""
    num_tokens: int
    """Tokens computed this step: 1 for a decode (plus its draft), a chunk for a prompt."""
    block_table: list[int]
    draft: list[int] = field(default_factory=list)
    """Draft tokens to verify after the decode's input token (the chunk's last ``len(draft)`` tokens); each of the
    chunk's rows then picks a token."""

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.start + self.num_tokens - len(self.draft) == self.request.num_tokens

    @property
    def token_ids(self) -> list[int]:
        own = self.request.all_token_ids[self.start : self.start + self.num_tokens - len(self.draft)]
        return own + self.draft if self.draft else own


@dataclass
class SchedulerOutput:
    """The plan of one step, for the model runner."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    """Scheduled sequences, in batch order; their tokens are laid out back to back."""
    preempted: list[str] = field(default_factory=list)
    """Request ids preempted while making this plan (their KV is gone)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


@dataclass
class SampledToken:
    """The runner's result for one sequence that sampled."""

    token_id: int
    logprob: TokenLogprob | None = None


StepResult = Mapping[str, "SampledToken | list[SampledToken]"]
"""The runner's results by request id: one token, or for a sequence that verified a draft the draft tokens it
accepted followed by one more (the correction of the first rejected one, or a bonus token when all passed)."""


class Scheduler:
    """Owns the waiting and running queues, admission, preemption and the finished decision."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, eos_token_ids: set[int]):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.proposer = (
            NgramProposer(config.speculative_tokens, config.speculative_ngram) if config.speculative_tokens else None
        )
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting: list[tuple[int, int, str]] = []  # heap of (priority, arrival seq, request id)
        self._arrivals = itertools.count()

    # -- queues ------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests
        request.arrival_seq = next(self._arrivals)
        self.requests[request.request_id] = request
        self._push_waiting(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request now and free its blocks; None if it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.status.finished:
            return None
        if request in self.running:
            self.running.remove(request)
        else:
            self._waiting = [w for w in self._waiting if w[2] != request_id]
            heapq.heapify(self._waiting)
        request.status = RequestStatus.FINISHED_ABORTED
        return self._finish(request, [])

    def fail(self, request_ids: list[str]) -> None:
        """Drop requests whose step failed: out of the queues and forgotten, their blocks freed (no output).

        Their KV written by the failed step lies past their computed tokens, in blocks no prefix key names yet,
        so the prefix cache keeps only what earlier steps computed.
        """
        ids = set(request_ids)
        self.running = [r for r in self.running if r.request_id not in ids]
        if any(w[2] in ids for w in self._waiting):
            self._waiting = [w for w in self._waiting if w[2] not in ids]
            heapq.heapify(self._waiting)
        for request_id in ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                request.status = RequestStatus.FINISHED_ERROR
            self.kv.free(request_id)

    def release(self, request_id: str) -> None:
        """Forget a finished request whose KV was retained for export."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.kv.free(request_id)

    def restart(self, kv: KVCacheManager) -> None:
        """Start over on a fresh KV pool (the old one's contents are gone): every unfinished request waits again,
        to be recomputed from its prompt and the tokens it has generated; finished ones holding KV are forgotten."""
        for request in self.running:
            request.status = RequestStatus.PREEMPTED
            request.num_preemptions += 1
            self._push_waiting(request)
        self.running = []
        for request_id, request in list(self.requests.items()):
            if request.status.finished:
                del self.requests[request_id]
            request.num_computed_tokens = 0
        self.kv = kv

    def _push_waiting(self, request: Request) -> None:
        heapq.heappush(self._waiting, (request.priority, request.arrival_seq, request.request_id))

    # -- planning ----------------------------------------------------------------------------------------

    def schedule(
        self, busy: Collection[str] = (), max_seqs: int | None = None, speculate: bool = False
    ) -> SchedulerOutput:
        """Plan one step under the token budget.

        ``busy``: requests in a step still in flight (a pipeline's micro-batches): not planned again and never
        preempted until it returns. ``max_seqs``: most sequences in this step (default: max_num_seqs).
        ``speculate``: decodes may bring draft tokens (when the config has speculation on); the caller's runner
        must then verify them.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        limit = max_seqs or self.config.max_num_seqs

        i = 0
        while i < len(self.running) and budget > 0 and len(out.seqs) < limit:
            request = self.running[i]
            if request.request_id in busy:
                i += 1
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            decoding = n == 1 and request.num_tokens - request.num_computed_tokens == 1
            draft = self._draft(request, budget - n) if speculate and decoding else []
            if draft and not self.kv.allocate(request.request_id, request.num_computed_tokens + n + len(draft)):
                draft = []  # no free slots for a guess: decode plainly rather than preempt anything for it
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + n):
                victim = self._victim(busy, i)
                if victim is None:
                    return out  # nothing left that may give up its blocks: wait for steps in flight
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.seqs.append(self._plan(request, n, draft))
                budget -= n + len(draft)
                i += 1
                continue
            break  # the sequence being planned was itself preempted: nothing newer is left

        # Nothing preempted this step is re-admitted in the same step: that would just thrash.
        while (
            self._waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and len(out.seqs) < limit
            and not out.preempted
        ):
            request = self.requests[self._waiting[0][2]]
            if not self.kv.has(request.request_id):
                cached = self.kv.lookup_prefix(request.request_id, request.all_token_ids)
                if request.num_computed_tokens == 0:
                    request.num_cached_tokens = cached
                request.num_computed_tokens = cached
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(request.request_id, request.num_computed_tokens + n):
                break  # keeps its prefix blocks; tries again next step
            heapq.heappop(self._waiting)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(self._plan(request, n))
            budget -= n
        return out

    def _victim(self, busy: Collection[str], first: int) -> Request | None:
        """The newest running request at index ``first`` or later that is not in flight: the one to preempt."""
        for request in reversed(self.running[first:]):
            if request.request_id not in busy:
                return request
        return None

    def _plan(self, request: Request, n: int, draft: list[int] | None = None) -> ScheduledSeq:
        assert n > 0
        table = self.kv.block_table(request.request_id)
        if not draft:
            return ScheduledSeq(request, request.num_computed_tokens, n, table)
        return ScheduledSeq(request, request.num_computed_tokens, n + len(draft), table, list(draft))

    def _draft(self, request: Request, room: int) -> list[int]:
        """Draft tokens for a decode, at most ``room`` and never more than the request may still emit after its
        next token; [] when it does not speculate."""
        if self.proposer is None or not request.params.speculative or request.prefill_only:
            return []
        left = min(
            room,
            request.params.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        return self.proposer.propose(request.all_token_ids, left) if left > 0 else []

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._push_waiting(request)

    # -- results -----------------------------------------------------------------------------------------

    def update(self, plan: SchedulerOutput, sampled: StepResult) -> list[RequestOutput]:
        """Advance the plan's sequences by what was computed and sampled; finish those that are done."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for seq in plan.seqs:
            request = seq.request
            if request.status.finished:  # aborted between schedule and update
                continue
            result = sampled.get(request.request_id)
            tokens = [] if result is None else [result] if isinstance(result, SampledToken) else result
            new: list[int] = []
            status = None
            for token in tokens:
                request.append_token(token.token_id)
                new.append(token.token_id)
                if token.logprob is not None:
                    request.pending_logprobs.append(token.logprob)
                status = self._stop_status(request, token.token_id)
                if status is not None:
                    break  # nothing past a stop token, EOS or the length limit, as when decoding one at a time
            # A verified draft holds valid KV for its input token and the draft tokens it kept: one position per
            # token emitted (the last one emitted is the next input). The rest of its chunk is not computed.
            request.num_computed_tokens += len(new) if seq.draft else seq.num_tokens
            self.kv.commit_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
            if not new:
                continue  # a prompt chunk that did not reach the end
            if request.first_token_time is None:
                request.first_token_time = now
            if status is not None:
                self.running.remove(request)
                request.status = status
                outputs.append(self._finish(request, new, now))
            else:
                outputs.append(self._output(request, new, now))
        return outputs

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        n = request.num_output_tokens
        if n >= params.min_tokens and (
            (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        if n >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if request.prefill_only:
            return RequestStatus.FINISHED_PREFILLED
        return None

    def _finish(self, request: Request, new_tokens: list[int], now: float | None = None) -> RequestOutput:
        status = request.status
        keep = request.retain_kv and status != RequestStatus.FINISHED_ABORTED
        if request.prefill_only:  # its KV is kept only for a decode worker that goes on with it
            keep = keep and status == RequestStatus.FINISHED_PREFILLED
        if not keep:
            self.kv.free(request.request_id)
            del self.requests[request.request_id]
        else:
            self.kv.shrink(request.request_id, request.num_computed_tokens)
        return self._output(request, new_tokens, now or time.monotonic())

    def _output(self, request: Request, new_tokens: list[int], now: float) -> RequestOutput:
        logprobs = None
        if request.params.logprobs is not None:
            logprobs, request.pending_logprobs = request.pending_logprobs, []
        prefill_hops = decode_hops = None
        if request.prefill_hops and not request.prefill_hops_reported:
            prefill_hops, request.prefill_hops_reported = list(request.prefill_hops.values()), True
        if request.status.finished and request.decode_hops:
            decode_hops = list(request.decode_hops.values())
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            num_output_tokens=request.num_output_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            finish_reason=request.status.finish_reason,
            logprobs=logprobs,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            time=now,
            prefill_hops=prefill_hops,
            decode_hops=decode_hops,
            decode_steps=request.decode_steps if decode_hops else 0,
        )
