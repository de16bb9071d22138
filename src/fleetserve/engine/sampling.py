"""Turns a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeds and log-probabilities.

Rows are processed together; only what some row asks for is computed (an all-greedy batch is one argmax).
A seeded request draws its noise from its own generator, so its text does not depend on its batch-mates.
``verify`` checks a sequence's draft tokens against the tokens this sampling picks, row after row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetserve.contract import TokenLogprob
from fleetserve.engine.request import Request


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Samples one token per row of logits, for the requests given in the same order."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], drafted: list[list[int]] | None = None
    ) -> SampleResult:
        """One token per row. ``drafted[i]``: tokens that follow request i's own in the context of row i (draft
        tokens already accepted in this step): penalties and min_tokens count them as output."""
        # logits: [N, V] float, one row per request
        logits = logits[:, : self.vocab_size].float()
        raw = logits
        params = [r.params for r in requests]
        drafted = drafted or [[] for _ in requests]
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), requests, drafted)
        if any(r.params.min_tokens > r.num_output_tokens + len(d) for r, d in zip(requests, drafted, strict=True)):
            logits = self._block_stop_tokens(logits if logits is not raw else logits.clone(), requests, drafted)

        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1) if all(greedy) else self._sample(logits, requests, greedy)
        token_list = tokens.tolist()

        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            rows = torch.tensor(want)
            lp = torch.log_softmax(raw[rows], dim=-1)  # the model's own distribution, before any processing
            chosen = lp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
            k = max(params[i].logprobs for i in want)
            top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(want):
                n = params[i].logprobs
                top = list(zip(top_i[j][:n], top_v[j][:n], strict=False))
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], top)
        return SampleResult(token_list, logprobs)

    def verify(self, logits: torch.Tensor, request: Request, draft: list[int]) -> SampleResult:
        """The tokens a sequence emits after verifying ``draft``: the draft tokens it keeps, then one more.

        logits: [len(draft) + 1, V]; row r follows the request's tokens and ``draft[:r]``. Row by row, the token
        is picked exactly as a plain decode step would pick it (same processing, same noise source, one draw per
        row); the draft token is kept while it equals that pick, and the first pick that differs ends the run
        (after a fully kept draft, the last row's pick is a bonus token). For a point-mass draft this is the
        rejection-sampling rule: the pick equals draft token t with probability p(t) (accept), and given that it
        does not, it is distributed as p with t removed and renormalised (the correction). So greedy and seeded
        requests produce the very tokens of plain decoding, and draw as much noise as they emit.
        """
        assert logits.shape[0] == len(draft) + 1
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for r in range(len(draft) + 1):
            pick = self(logits[r : r + 1], [request], [draft[:r]])
            tokens.append(pick.token_ids[0])
            logprobs.append(pick.logprobs[0])
            if r == len(draft) or tokens[-1] != draft[r]:
                break
        return SampleResult(tokens, logprobs)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request], drafted: list[list[int]]) -> torch.Tensor:
        for i, (r, extra) in enumerate(zip(requests, drafted, strict=True)):
            p = r.params
            if not p.has_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_token_ids).union(extra)), dtype=torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            output = r.output_token_ids + extra if extra else r.output_token_ids
            if (p.presence_penalty or p.frequency_penalty) and output:
                counts = torch.bincount(torch.tensor(output), minlength=row.numel())[: row.numel()]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _block_stop_tokens(
        self, logits: torch.Tensor, requests: list[Request], drafted: list[list[int]]
    ) -> torch.Tensor:
        # Before min_tokens, neither EOS nor the request's stop tokens may be chosen.
        for i, (r, extra) in enumerate(zip(requests, drafted, strict=True)):
            if r.params.min_tokens > r.num_output_tokens + len(extra):
                stops = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    stops |= self.eos_token_ids
                ids = [t for t in stops if t < logits.shape[1]]
                if ids:
                    logits[i, ids] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request], greedy: list[bool]) -> torch.Tensor:
        params = [r.params for r in requests]
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params]).unsqueeze(1)
        probs_logits = logits / temps
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            probs_logits = self._filter(probs_logits, params)
        probs = torch.softmax(probs_logits, dim=-1)
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, with per-row noise sources.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _filter(logits: torch.Tensor, params) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).unsqueeze(1)
        top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
        min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
        ranks = torch.arange(vocab).unsqueeze(0)
        drop = ranks >= top_k
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= top_p
        drop |= probs < min_p * probs[:, :1]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
