"""LLMEngine: token ids in, token ids out. add_request / step / abort, plus KV export and import.

A step is: schedule, execute, update. Everything runs in the caller's thread; AsyncEngine wraps it for asyncio.
A step that fails stops only the requests it ran (EngineStepError); the engine keeps serving the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from fleetserve.config import EngineConfig, ModelConfig
from fleetserve.contract import EngineStats, KVTransfer, RequestOutput, SamplingParams
from fleetserve.engine.kv_cache import KVCacheManager
from fleetserve.engine.kv_pins import SESSION, TRANSFER, KVPins, PinnedKV
from fleetserve.engine.model_runner import ModelRunner
from fleetserve.engine.pipeline import PipelineHead, StageLink
from fleetserve.engine.request import Request
from fleetserve.engine.scheduler import Scheduler, SchedulerOutput, StepResult
from fleetserve.errors import CapacityError, EngineStepError, InvalidRequestError
from fleetserve.model_files import load_arch, prepare_model_dir

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class LLMEngine:
    """One model, one paged KV cache, one scheduler."""

    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        self.config = (config or EngineConfig()).validate()
        mc = self.config.model
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        started = time.monotonic()
        self.model_dir = prepare_model_dir(mc.model, progress=progress)
        self.arch = load_arch(self.model_dir)
        if mc.layer_end is not None and mc.layer_end > self.arch.num_layers:
            raise InvalidRequestError(
                f"layer_end {mc.layer_end} is past the model's {self.arch.num_layers} layers", "layer_end"
            )
        self.runner = ModelRunner(self.config, self.model_dir, self.arch)
        self.max_model_len = min(
            mc.max_model_len or self.arch.max_position_embeddings, self.arch.max_position_embeddings
        )
        self.eos_token_ids = set(self.arch.eos_token_ids)
        self.kv = KVCacheManager(
            self.runner.num_blocks, self.config.cache.block_size, self.config.cache.enable_prefix_caching
        )
        sc = self.config.scheduler
        sc.max_num_batched_tokens = sc.token_budget(self.runner.device.type)  # resolved once, for all who read it
        self.scheduler = Scheduler(sc, self.kv, self.max_model_len, self.eos_token_ids)
        self.pins = KVPins(self.scheduler.release, lambda: self.kv.num_blocks, self.config.retention)
        """Finished requests' KV kept by name: sessions (for their next turn) and prefills (for a decode worker)."""
        self.pipeline: PipelineHead | None = None
        """Set when this engine is a pipeline's head (``attach_link``): its steps then run down a chain of stages.
        An engine whose layers stop short of the last one is a head from the start, waiting for its chain: it never
        samples from a part of the model."""
        if not self.runner.model.is_last:
            self.pipeline = PipelineHead(self, None, 1)
        self._ids = itertools.count()
        self._preemptions = 0
        self._steps = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.failed_steps = 0
        self.consecutive_failed_steps = 0
        """Failed steps since the last one that succeeded (a health signal: a fault that keeps recurring)."""
        self.last_step_error: str | None = None
        wf = self.runner.weight_format
        log.info(
            "engine ready: %s on %s, %s weights (%s), %s activations, %d %s KV blocks of %d tokens (%.0f MiB), %.1fs",
            mc.model,
            self.runner.device,
            wf.name,
            wf.reason,
            str(self.runner.dtype).removeprefix("torch."),
            self.runner.num_blocks,
            str(self.runner.kv_dtype).removeprefix("torch."),
            self.config.cache.block_size,
            self.runner.kv_cache_bytes / 2**20,
            time.monotonic() - started,
        )

    @classmethod
    def from_model(cls, model: str = "smollm2-135m-instruct", progress: bool = True, **model_options) -> LLMEngine:
        """Shortcut: an engine on ``model`` with default cache and scheduler settings."""
        return cls(EngineConfig(model=ModelConfig(model=model, **model_options)), progress=progress)

    # -- requests ----------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        retain_kv: bool = False,
        kv_import: KVTransfer | None = None,
        resumed_output: list[int] | None = None,
        session_id: str | None = None,
        session_ttl_s: float | None = None,
        prefill_only: bool = False,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError or CapacityError, changing nothing.

        ``resumed_output`` continues a generation begun elsewhere: those tokens were already generated; they are
        prefilled after the prompt and count as output (for max_tokens, min_tokens, penalties and the seeded
        generator), so the continuation is the one the first engine would have produced. With ``kv_import`` the
        KV of the prompt computed elsewhere is imported instead of computed (a decode worker going on from a
        prefill worker's first token).

        ``session_id``: once finished, the request's KV stays pinned as that session's (``session_ttl_s`` or the
        engine's TTL) so the conversation's next turn prefills only its new tokens. ``prefill_only``: the request
        stops after its first token (finish reason "prefilled", unless it ends there anyway) and its KV stays
        pinned until ``export_kv`` and ``release``, or the transfer TTL.
        """
        params = (params or SamplingParams()).validate()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        vocab = self.arch.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has {len(prompt)} "
                f"and max_tokens asks for {params.max_tokens} more ({len(prompt) + params.max_tokens}): "
                "shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        need = -(-(len(prompt) + params.max_tokens) // self.kv.block_size)
        if need > self.kv.num_blocks:
            raise CapacityError(
                f"the request needs {need} KV blocks at most but the cache holds {self.kv.num_blocks}: "
                "lower max_tokens or give the engine more kv_cache_bytes"
            )
        resumed = self._checked_resumed(resumed_output, params)
        if session_id is not None:
            self._check_session(session_id, session_ttl_s, len(prompt) + params.max_tokens)
        request = Request(
            request_id,
            prompt,
            params,
            priority=priority,
            retain_kv=retain_kv or session_id is not None or prefill_only,
            session_id=session_id,
            session_ttl_s=session_ttl_s,
            prefill_only=prefill_only,
        )
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        for token in resumed:
            request.append_token(token)
        if request.generator is not None and not params.greedy:
            for _ in resumed:  # one draw of noise per sampled token, as the sampler makes them
                torch.empty(self.arch.vocab_size).exponential_(generator=request.generator)
        if kv_import is not None:
            self._import_kv(request, kv_import)
        if session_id is not None:
            self.pins.touch(SESSION, session_id)
        self.scheduler.add(request)
        return request_id

    def _checked_resumed(self, resumed_output: list[int] | None, params: SamplingParams) -> list[int]:
        resumed = list(resumed_output or ())
        vocab = self.arch.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in resumed):
            raise InvalidRequestError(f"resumed token ids must be integers in [0, {vocab})", "resumed_output")
        if resumed and len(resumed) >= params.max_tokens:
            raise InvalidRequestError(
                f"{len(resumed)} tokens were already generated but max_tokens is {params.max_tokens}: nothing to resume",
                "resumed_output",
            )
        return resumed

    def _check_session(self, session_id: str, ttl_s: float | None, most_tokens: int) -> None:
        retention = self.config.retention
        if not session_id or len(session_id) > 256:
            raise InvalidRequestError("a session id is 1 to 256 characters", "session_id")
        if retention.max_sessions == 0:
            raise InvalidRequestError("this engine keeps no sessions (max_sessions is 0)", "session_id")
        if most_tokens > retention.max_session_tokens:
            raise InvalidRequestError(
                f"session {session_id!r} would hold up to {most_tokens} tokens (the prompt and max_tokens) but a "
                f"session holds at most {retention.max_session_tokens}: start a new session, shorten the history "
                "or lower max_tokens",
                "session_id",
            )
        if ttl_s is not None and ttl_s < 0:
            raise InvalidRequestError("a session's TTL must not be negative", "session_ttl_s")

    def _import_kv(self, request: Request, transfer: KVTransfer) -> None:
        """Take the prompt's KV from ``transfer`` (tokens [start, start + num_tokens)); what this engine's prefix
        cache already holds is taken from there. If the cache no longer reaches ``start`` (the blocks were evicted
        since the caller asked), nothing is imported: the request prefills here instead."""
        arch, runner = self.arch, self.runner
        expected = (runner.model.num_local_layers, arch.num_kv_heads, arch.head_dim)
        if (transfer.num_layers, transfer.num_kv_heads, transfer.head_dim) != expected:
            raise InvalidRequestError(
                f"KV shape (layers, kv heads, head dim) {(transfer.num_layers, transfer.num_kv_heads, transfer.head_dim)}"
                f" does not match this engine's {expected}",
                "kv_import",
            )
        itemsize = DTYPE_BYTES.get(transfer.dtype)
        if itemsize is None:
            raise InvalidRequestError(f"unknown KV dtype {transfer.dtype!r}", "kv_import")
        if transfer.start < 0 or transfer.num_tokens < 1:
            raise InvalidRequestError("the imported KV covers no tokens", "kv_import")
        size = transfer.num_layers * transfer.num_tokens * 2 * transfer.num_kv_heads * transfer.head_dim * itemsize
        if len(transfer.data) != size:
            raise InvalidRequestError(
                f"the imported KV has {len(transfer.data)} bytes; its shape and dtype make {size}", "kv_import"
            )
        end = transfer.start + transfer.num_tokens
        if len(transfer.token_ids) < end or transfer.token_ids[:end] != request.all_token_ids[:end]:
            raise InvalidRequestError("the imported KV belongs to other tokens than this prompt's", "kv_import")
        rid = request.request_id
        cached = self.kv.lookup_prefix(rid, request.all_token_ids)
        # At least one token is left to compute, so the next step produces logits.
        num = min(end, request.num_tokens - 1)
        if cached < transfer.start or num <= cached:
            self.kv.free(rid)  # a gap before the imported part, or nothing new in it: the scheduler starts over
            return
        if not self.kv.allocate(rid, num):
            self.kv.free(rid)
            raise CapacityError("no free KV blocks to import into: try again when the engine is less busy")
        data = ModelRunner.kv_tensor(transfer)[:, cached - transfer.start : num - transfer.start]
        self.runner.write_kv(self.kv.block_table(rid), data, first=cached)
        request.num_computed_tokens = num
        request.num_cached_tokens = cached
        self.kv.commit_full_blocks(rid, request.all_token_ids, num)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks at once; returns its final output (finish_reason "abort")."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run and update one iteration; return what each touched request produced.

        If running or updating the plan raises, the plan's requests are dropped (blocks freed) and EngineStepError
        names them; the other requests stay queued and the next step serves them.
        """
        self.pins.expire()
        outputs = self._step()
        self._pin_finished(outputs)
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self.pipeline is not None:
            # A pipeline's head does not speculate: its stages would have to compute the drafts' rows too.
            return self.pipeline.step()
        plan = self.scheduler.schedule(speculate=True)
        self.count_preemptions(len(plan.preempted))
        if plan.empty:
            return []
        try:
            sampled = self.runner.execute(plan)
            outputs = self.scheduler.update(plan, sampled)
        except Exception as exc:  # any fault of the step: fail its requests, keep the engine
            raise self.fail_step(plan, exc) from exc
        self.count_step()
        self._count_drafts(plan, sampled)
        return outputs

    def _count_drafts(self, plan: SchedulerOutput, sampled: StepResult) -> None:
        """Count the step's draft tokens, and those verification kept (every token it emitted but the last)."""
        for seq in plan.seqs:
            result = sampled.get(seq.request.request_id)
            if seq.draft and isinstance(result, list):
                self.spec_draft_tokens += len(seq.draft)
                self.spec_accepted_tokens += len(result) - 1

    def _pin_finished(self, outputs: list[RequestOutput]) -> None:
        """Pin what finished requests retained for a session or a decode worker."""
        for out in outputs:
            if not out.finished:
                continue
            request = self.scheduler.requests.get(out.request_id)
            if request is None or not self.kv.has(out.request_id):
                continue  # not retained
            held = request.all_token_ids[: request.num_computed_tokens]
            table = self.kv.block_table(out.request_id)
            if request.prefill_only:
                self.pins.pin(TRANSFER, request.request_id, request.request_id, held, table)
            elif request.session_id is not None:
                self.pins.pin(SESSION, request.session_id, request.request_id, held, table, request.session_ttl_s)

    def count_preemptions(self, n: int) -> None:
        self._preemptions += n

    def count_step(self) -> None:
        """A step succeeded: count it, and the engine is healthy again."""
        self._steps += 1
        self.consecutive_failed_steps = 0

    def fail_step(self, plan: SchedulerOutput, exc: Exception) -> EngineStepError:
        """Drop the plan's requests (their blocks freed) after ``exc``; the error to raise for them."""
        ids = [seq.request.request_id for seq in plan.seqs]
        self.scheduler.fail(ids)
        self.failed_steps += 1
        self.consecutive_failed_steps += 1
        self.last_step_error = f"{type(exc).__name__}: {exc}"
        log.error("engine step failed, stopping its %d requests: %s", len(ids), self.last_step_error, exc_info=exc)
        return EngineStepError(f"the engine step running this request failed: {self.last_step_error}", ids)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run ``prompts`` together to completion; return each one's output token ids (a convenience for tests)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=False)]
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]

    # -- pipeline head ---------------------------------------------------------------------------------------

    def attach_link(self, link: StageLink, depth: int, name: str = "head") -> None:
        """Run this engine's steps down ``link`` (a chain of later stages), ``depth`` micro-batches in flight.

        The KV pool starts empty: what the stages held before (if anything) is gone.
        """
        self.reset_kv()
        if self.pipeline is None:
            self.pipeline = PipelineHead(self, link, depth, name)
        else:
            self.pipeline.replace_link(link, depth, name)

    def detach_link(self) -> None:
        """Stop being a pipeline's head: steps run in this engine alone again when it holds the whole model; a part
        of one waits for its next chain instead."""
        if self.pipeline is None:
            return
        if not self.runner.model.is_last:
            self.pipeline.suspend("detached from its chain of stages")
            return
        if self.pipeline.link is not None:
            self.pipeline.link.close()
        self.pipeline = None
        self.reset_kv()

    def reset_kv(self) -> None:
        """A fresh KV pool: every unfinished request waits again and is recomputed from its tokens; pinned KV is
        gone."""
        self.kv = KVCacheManager(
            self.runner.num_blocks, self.config.cache.block_size, self.config.cache.enable_prefix_caching
        )
        self.scheduler.restart(self.kv)
        self.pins.clear()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the compiled decode steps to be built; True when they are (at once when steps run eagerly)."""
        return self.runner.compiled is None or self.runner.compiled.wait(timeout)

    def reconfigure(self, layer_end: int, kv_cache_bytes: int) -> None:
        """Take a new layer range [0, layer_end) with the LM head (a pipeline head's new share) and a new KV size.

        Weights are reloaded only when the range changes. Unfinished requests wait again (``reset_kv``), and a
        pipeline's current link is dropped (steps in flight on it are forgotten) until ``attach_link``.
        """
        if self.pipeline is not None:
            self.pipeline.suspend("the pipeline is being re-partitioned")
        mc = self.config.model
        if layer_end != self.runner.model.layer_end or kv_cache_bytes != self.config.cache.kv_cache_bytes:
            config = dataclasses.replace(
                self.config,
                model=dataclasses.replace(mc, layer_start=0, layer_end=layer_end, lm_head=True),
                cache=dataclasses.replace(self.config.cache, kv_cache_bytes=kv_cache_bytes),
            ).validate()
            if layer_end != self.runner.model.layer_end:
                self.runner.close()
                self.runner = ModelRunner(config, self.model_dir, self.arch)
            else:
                self.runner.resize_kv(kv_cache_bytes)
            self.config = config
        self.reset_kv()
        unfit = [
            r.request_id
            for r in self.scheduler.requests.values()
            if -(-(r.num_prompt_tokens + r.params.max_tokens) // self.kv.block_size) > self.kv.num_blocks
        ]
        if unfit and self.pipeline is not None:  # they could never be scheduled again: tell their streams now
            self.scheduler.fail(unfit)
            self.pipeline.pending_failure = EngineStepError(
                f"the pipeline's new KV cache holds {self.kv.num_blocks} blocks: too few for this request", unfit
            )

    # -- KV export ---------------------------------------------------------------------------------------

    def export_kv(self, request_id: str, start: int = 0, end: int | None = None) -> KVTransfer:
        """The computed KV of a live request, or of a finished one that retained it (retain_kv, a session or a
        prefill): tokens [start, end) of it, end defaulting to every computed token."""
        request = self.scheduler.requests.get(request_id)
        if request is None or not self.kv.has(request_id):
            raise InvalidRequestError(f"request {request_id!r} has no KV to export", "request_id")
        computed = request.num_computed_tokens
        end = computed if end is None else end
        if not 0 <= start <= end <= computed:
            raise InvalidRequestError(
                f"KV range [{start}, {end}) is outside the {computed} computed tokens of {request_id!r}", "start"
            )
        return self.runner.kv_transfer(request.all_token_ids[:end], self.kv.block_table(request_id), start, end)

    def release(self, request_id: str) -> None:
        """Free the KV a finished request still holds (retained, pinned or not)."""
        if not self.pins.release_request(request_id):
            self.scheduler.release(request_id)

    def release_session(self, session_id: str) -> bool:
        """Unpin a session's KV now; False when this engine holds no such session."""
        return self.pins.release(SESSION, session_id)

    def pinned(self) -> list[PinnedKV]:
        """Sessions and transfers holding KV, with their sizes and idle times."""
        self.pins.expire()
        return self.pins.report()

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Tokens of ``token_ids``' start that the prefix cache holds right now (block-aligned; nothing taken)."""
        return self.kv.cached_prefix(token_ids)

    def stats(self) -> EngineStats:
        kv = self.kv.stats()
        return EngineStats(
            running=self.scheduler.num_running,
            waiting=self.scheduler.num_waiting,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.used_blocks,
            kv_blocks_free=kv.free_blocks,
            kv_blocks_cached=kv.cached_blocks,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_preemptions=self._preemptions,
            steps=self._steps,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
            decode_graphs_ready=self.runner.decode_graphs[0],
            decode_graphs_pending=self.runner.decode_graphs[1],
            extra={
                "failed_steps": self.failed_steps,
                "consecutive_failed_steps": self.consecutive_failed_steps,
                **(self.pipeline.stats() if self.pipeline is not None else {}),
                **self.pins.counts(),
            },
        )
