"""Pipeline stages: the head's step loop with micro-batches in flight, a later stage's layers, tensors as bytes.

The head is an LLMEngine whose model holds the first layers, the embeddings and the LM head. Its scheduler plans
every step for the whole pipeline; it runs its own layers and hands the hidden states to a ``StageLink`` (the
transport, which the engine does not know), which carries them down the chain of stages. While a step is in
flight the head plans the next one from the requests not in flight, up to ``depth`` steps at once, so that the
stages work at the same time. A result brings back the sampling rows' hidden states; the head samples and updates
its requests as a single engine would, so greedy and seeded outputs are the same.

When the link breaks, every request waits again with what it has generated, the KV pool starts empty, and the
head recomputes them once it has a whole pipeline again (``LLMEngine.reconfigure``). Only if no pipeline comes back
within ``broken_timeout_s`` do its requests fail (EngineStepError), so the gateway can serve them elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from fleetserve.contract import RequestOutput, StageHop, StageResult, StageSeq
from fleetserve.engine.model_runner import DTYPES, ModelRunner
from fleetserve.engine.scheduler import SampledToken, SchedulerOutput
from fleetserve.errors import EngineStepError, InvalidRequestError, StageLinkError

if TYPE_CHECKING:
    from fleetserve.engine.engine import LLMEngine

log = logging.getLogger(__name__)


# -- tensors on the wire ---------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    """A tensor as (raw bytes, shape, dtype name); bfloat16 travels as its 16-bit words."""
    cpu = tensor.detach().contiguous().cpu()
    raw = cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu
    return raw.numpy().tobytes(), list(cpu.shape), str(cpu.dtype).removeprefix("torch.")


def tensor_from_bytes(data: bytes, shape: Sequence[int], dtype: str, columns: int | None = None) -> torch.Tensor:
    """Inverse of ``tensor_bytes``, checked: a 2-d tensor whose size matches ``data`` (and ``columns``), or
    InvalidRequestError saying what is wrong."""
    if dtype not in DTYPES:
        raise InvalidRequestError(f"hidden states of dtype {dtype!r}: expected one of {', '.join(DTYPES)}", "hidden")
    shape = [int(d) for d in shape]
    if len(shape) != 2 or min(shape) < 0 or (columns is not None and shape[1] != columns):
        raise InvalidRequestError(f"hidden states of shape {shape}: expected [tokens, {columns}]", "hidden")
    torch_dtype = DTYPES[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != math.prod(shape) * size:
        raise InvalidRequestError(
            f"hidden states of shape {shape} and dtype {dtype} need {math.prod(shape) * size} bytes, got {len(data)}",
            "hidden",
        )
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    if torch_dtype == torch.bfloat16:
        return torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


def sampling_rows(seqs: Sequence[StageSeq], hidden: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden`` whose logits pick a token: each sampling sequence's last."""
    rows, offset = [], 0
    for seq in seqs:
        offset += seq.num_tokens
        if seq.samples:
            rows.append(offset - 1)
    return hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)]


def stage_seqs(plan: SchedulerOutput) -> list[StageSeq]:
    return [StageSeq(s.start, s.num_tokens, list(s.block_table), s.samples) for s in plan.seqs]


@torch.inference_mode()
def measure_layer_seconds(arch, dtype: torch.dtype, device: torch.device, seqs: int = 8, context: int = 64) -> float:
    """Seconds one decoder layer takes for a decode step of ``seqs`` sequences ``context`` tokens long, on this
    machine (random weights: the time does not depend on their values). The partitioner weighs nodes by it."""
    from fleetserve.engine.attention import build_attention_batch
    from fleetserve.engine.models.linear import choose_kernels
    from fleetserve.engine.models.llama import LlamaModel

    layer_start = 1 if arch.num_layers > 1 else 0
    model = LlamaModel(arch, layer_start, layer_start + 1, lm_head=False).to(device=device, dtype=dtype).eval()
    choose_kernels(model)
    block = 16
    per_seq = -(-(context + 1) // block)
    kv = torch.zeros(seqs * per_seq * block, 2, arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    batch = build_attention_batch([context] * seqs, [1] * seqs, tables, block, device)
    positions = torch.full((seqs,), context, dtype=torch.long, device=device)
    hidden = torch.randn(seqs, arch.hidden_size, dtype=dtype, device=device) if layer_start else None
    inputs = hidden if hidden is not None else torch.zeros(seqs, dtype=torch.long, device=device)
    times = []
    for _ in range(6):
        started = time.perf_counter()
        model(inputs, positions, [kv], batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]  # the median after a warm-up run


# -- a later stage ---------------------------------------------------------------------------------------------


@dataclass
class _StagePlan:
    seqs: list[StageSeq]


class StageExecutor:
    """A stage after the head: its layers and their KV blocks (the head's block ids), nothing else."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def run(self, seqs: Sequence[StageSeq], hidden: torch.Tensor) -> torch.Tensor:
        """This stage's layers on one step's hidden states; InvalidRequestError when the step does not fit."""
        total = sum(s.num_tokens for s in seqs)
        if not seqs or total != hidden.shape[0]:
            raise InvalidRequestError(f"a step of {total} tokens came with {hidden.shape[0]} hidden rows", "hidden")
        for seq in seqs:
            need = -(-(seq.start + seq.num_tokens) // self.runner.block_size)
            if seq.start < 0 or seq.num_tokens < 1 or len(seq.block_table) < need:
                raise InvalidRequestError("a sequence's block table does not cover its tokens", "block_table")
            if any(not 0 <= b < self.runner.num_blocks for b in seq.block_table):
                raise InvalidRequestError(f"block ids must be in [0, {self.runner.num_blocks})", "block_table")
        return self.runner.forward(_StagePlan(list(seqs)), hidden)  # type: ignore[arg-type]


# -- the head --------------------------------------------------------------------------------------------------


class StageLink(Protocol):
    """The head's way down the chain of stages and back; the worker implements it over gRPC."""

    def send(self, step: int, seqs: list[StageSeq], hidden: torch.Tensor) -> None:
        """Queue one step for the next stage; StageLinkError if the link is broken."""

    def receive(self, timeout: float) -> StageResult | None:
        """The next step's result (in send order), None after ``timeout`` seconds; StageLinkError if broken."""

    def close(self) -> None: ...


@dataclass
class _InFlight:
    plan: SchedulerOutput
    compute_s: float
    """The head's own layers for this step."""


@dataclass
class PipelineTelemetry:
    """Per-hop figures since the pipeline was (re)built, for stats and metrics."""

    steps: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)
    """Compute seconds per stage name (the head's own included)."""
    transfer_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    hops: list[list[StageHop]] = field(default_factory=list)
    """The last few steps' hops, newest last."""
    active_s: float = 0.0
    """Time with at least one step in flight (the bubble's denominator), up to ``active_since``."""
    active_since: float | None = None

    def add(self, head: StageHop, hops: list[StageHop]) -> None:
        self.steps += 1
        for hop in [head, *hops]:
            self.busy_s[hop.name] = self.busy_s.get(hop.name, 0.0) + hop.compute_s
            self.transfer_s[hop.name] = self.transfer_s.get(hop.name, 0.0) + hop.transfer_s
            self.bytes[hop.name] = self.bytes.get(hop.name, 0) + hop.bytes
        self.hops = [*self.hops[-15:], [head, *hops]]

    def working(self, busy: bool, now: float | None = None) -> None:
        """Whether steps are in flight from now on (the pipeline's active time is counted from these marks)."""
        now = now or time.monotonic()
        if busy and self.active_since is None:
            self.active_since = now
        elif not busy and self.active_since is not None:
            self.active_s += now - self.active_since
            self.active_since = None

    def bubble(self, now: float | None = None) -> float:
        """Share of the stages' time spent idle while steps were in flight (0 when nothing ran)."""
        now = now or time.monotonic()
        active = self.active_s + (now - self.active_since if self.active_since is not None else 0.0)
        if active <= 0 or not self.busy_s:
            return 0.0
        busy = sum(min(s, active) for s in self.busy_s.values()) / (active * len(self.busy_s))
        return max(0.0, 1.0 - busy)


class PipelineHead:
    """Drives an LLMEngine as a pipeline's head: plans micro-batches, sends them, samples what comes back."""

    def __init__(
        self,
        engine: LLMEngine,
        link: StageLink | None,
        depth: int,
        name: str = "head",
        broken_timeout_s: float = 30.0,
    ):
        self.engine = engine
        self.link: StageLink | None = link
        self.depth = max(1, depth)
        self.name = name
        self.broken_timeout_s = broken_timeout_s
        self.broken_since: float | None = None if link is not None else time.monotonic()
        self.broken_reason = "" if link is not None else "waiting for its chain of stages"
        self.in_flight: dict[int, _InFlight] = {}
        self._steps = itertools.count()
        self.telemetry = PipelineTelemetry()
        self.link_failures = 0
        self.pending_failure: EngineStepError | None = None
        """Requests dropped outside a step (a new pipeline too small for them): raised by the next step."""

    # -- the link's life -------------------------------------------------------------------------------------

    def replace_link(self, link: StageLink, depth: int | None = None, name: str | None = None) -> None:
        """A whole pipeline again (the engine has reset its KV pool): start stepping on ``link``."""
        self.name = name or self.name
        if self.link is not None and self.link is not link:
            self.link.close()
        self.link, self.broken_since, self.broken_reason = link, None, ""
        self.depth = max(1, depth or self.depth)
        self.in_flight.clear()
        self.telemetry = PipelineTelemetry()

    def _break(self, reason: str) -> None:
        """The chain is gone: every request waits again, with an empty KV pool, until the next link."""
        log.warning("pipeline link broke: %s; %d steps were in flight", reason, len(self.in_flight))
        self.link_failures += 1
        self.suspend(reason)

    def suspend(self, reason: str) -> None:
        """Stop using the current link (the pipeline is being changed, or broke): nothing in flight counts any more,
        every request waits again with an empty KV pool, until ``replace_link``."""
        if self.link is not None:
            self.link.close()
        self.link = None
        if self.broken_since is None:
            self.broken_since, self.broken_reason = time.monotonic(), reason
        self.in_flight.clear()
        self.telemetry.working(False)
        self.engine.reset_kv()

    # -- one pump of the loop ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Launch what may go, then take one result (waiting a little for it); the outputs it made."""
        if self.pending_failure is not None:
            failure, self.pending_failure = self.pending_failure, None
            raise failure
        if self.link is None:
            return self._while_broken()
        try:
            self._launch()
            if not self.in_flight:
                return []
            result = self.link.receive(timeout=0.05)
        except StageLinkError as exc:
            self._break(str(exc))
            return []
        if result is None:
            return []
        return self._complete(result)

    def _while_broken(self) -> list[RequestOutput]:
        time.sleep(0.02)  # the engine thread polls its commands in between: reconfigure arrives that way
        scheduler = self.engine.scheduler
        waited = time.monotonic() - (self.broken_since or time.monotonic())
        if waited < self.broken_timeout_s or not scheduler.has_unfinished():
            return []
        ids = list(scheduler.requests)
        scheduler.fail(ids)
        raise EngineStepError(
            f"the pipeline has had no whole chain of stages for {waited:.0f}s ({self.broken_reason})", ids
        )

    def _launch(self) -> None:
        engine, scheduler = self.engine, self.engine.scheduler
        while len(self.in_flight) < self.depth:
            busy = {seq.request.request_id for f in self.in_flight.values() for seq in f.plan.seqs}
            active = scheduler.num_running + scheduler.num_waiting
            plan = scheduler.schedule(busy=busy, max_seqs=max(1, math.ceil(active / self.depth)))
            engine.count_preemptions(len(plan.preempted))
            if plan.empty:
                return
            started = time.monotonic()
            try:
                hidden = engine.runner.forward(plan)
            except Exception as exc:  # the head's own layers failed: this micro-batch's requests only
                raise engine.fail_step(plan, exc) from exc
            step = next(self._steps)
            computed = time.monotonic()
            self.telemetry.working(True, started)
            self.link.send(step, stage_seqs(plan), hidden)  # type: ignore[union-attr]
            self.in_flight[step] = _InFlight(plan, computed - started)

    def _complete(self, result: StageResult) -> list[RequestOutput]:
        flight = self.in_flight.pop(result.step, None)
        if not self.in_flight:
            self.telemetry.working(False)
        if flight is None:
            log.warning("pipeline result for unknown step %d ignored", result.step)
            return []
        engine, plan = self.engine, flight.plan
        if result.error:
            raise engine.fail_step(plan, RuntimeError(f"a stage failed the step: {result.error}"))
        started = time.monotonic()
        try:
            sampled = self._sample(plan, result.hidden)
            head = StageHop(
                self.name,
                engine.runner.model.layer_start,
                engine.runner.model.layer_end,
                flight.compute_s + time.monotonic() - started,
                result.return_transfer_s,
                result.return_bytes,
            )
            hops = [head, *result.hops]
            for seq in plan.seqs:  # the whole step's time is what each of its requests waited
                seq.request.add_hops(hops, prefill=seq.start < seq.request.num_prompt_tokens)
            outputs = engine.scheduler.update(plan, sampled)
        except Exception as exc:  # a bad result fails this micro-batch, not the engine
            raise engine.fail_step(plan, exc) from exc
        self.telemetry.add(head, result.hops)
        engine.count_step()
        return outputs

    def _sample(self, plan: SchedulerOutput, hidden: object) -> dict[str, SampledToken]:
        requests = [seq.request for seq in plan.seqs if seq.samples]
        if not requests:
            return {}
        runner = self.engine.runner
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != (len(requests), runner.arch.hidden_size):
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
            raise InvalidRequestError(
                f"the last stage returned hidden states of shape {got}, expected ({len(requests)}, "
                f"{runner.arch.hidden_size})",
                "hidden",
            )
        with torch.inference_mode():
            logits = runner.model.compute_logits(hidden.to(device=runner.device, dtype=runner.dtype))
            result = runner.sampler(logits.cpu() if logits.device.type != "cpu" else logits, requests)
        return {r.request_id: SampledToken(t, lp) for r, t, lp in zip(requests, result.token_ids, result.logprobs)}

    def stats(self) -> dict[str, object]:
        t = self.telemetry
        return {
            "pipeline_depth": self.depth,
            "pipeline_in_flight": len(self.in_flight),
            "pipeline_broken": self.broken_reason if self.link is None else "",
            "pipeline_link_failures": self.link_failures,
            "pipeline_bubble": round(t.bubble(), 4),
            "pipeline_steps": t.steps,
        }
