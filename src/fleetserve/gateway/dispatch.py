"""One request's life on the workers: admission, the chosen worker's token stream, retries and failover.

A failure before the request's first token is retried on another worker after an exponential backoff with
jitter. A failure after tokens were sent resumes the request on another worker: the prompt plus the tokens
already sent are prefilled there (as ``resumed_output_ids``, so they count as output for max_tokens, penalties
and seeds) and the stream goes on where it stopped; the caller sees one stream with no token repeated or
missing. Both count against ``max_retries``. Every attempt is recorded in the request's trace.

gRPC statuses become typed errors here: INVALID_ARGUMENT -> InvalidRequestError, RESOURCE_EXHAUSTED ->
CapacityError (neither is retried: another worker would say the same); UNAVAILABLE, CANCELLED (the gateway
closed the channel of a worker it declared dead), DEADLINE_EXCEEDED, INTERNAL and UNKNOWN are retried; when
the retries are spent the request fails with UpstreamError.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from fleetserve.contract import SamplingParams
from fleetserve.errors import CapacityError, InvalidRequestError, UpstreamError
from fleetserve.gateway.admission import Admission, Lease
from fleetserve.gateway.model_policies import ModelPolicies
from fleetserve.gateway.pipeline_state import hop_json
from fleetserve.gateway.policies.base import RouteRequest
from fleetserve.gateway.registry import DECODE_ROLE, PREFILL_ROLE, WorkerRecord, WorkerRegistry, WorkerState
from fleetserve.gateway.sessions import SessionTable
from fleetserve.protocol import convert
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.tracing import Attempt, Trace

log = logging.getLogger(__name__)

PREFILLED = "prefilled"
"""A prefill worker's finish reason: the first token is out, the KV waits for a decode worker."""

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


@dataclass
class RetryPolicy:
    max_retries: int = 3
    """Attempts after the first, for failures before and after the first token together."""
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0

    def delay(self, retry: int) -> float:
        """Exponential backoff with full jitter: uniform in [0, base * 2^(retry-1)], capped."""
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1)))


@dataclass
class _Progress:
    """One request's progress across its attempts."""

    route: RouteRequest
    trace: Trace | None
    sent: list[int] = field(default_factory=list)
    """Token ids already streamed to the client, from every attempt."""
    cached_tokens: int | None = None
    """Prompt tokens the first placement found cached (what usage reports)."""
    produced: int = 0
    """Tokens of the current attempt."""
    handoff: pb.KvSource | None = None
    """Set when a prefill worker has sent the first token: where the decode worker fetches the prompt's KV."""


def _cut_off_under_us() -> bool:
    """Whether a CancelledError comes from a worker's call cut off under us (its channel closed) rather than from
    this request's own cancellation; Python 3.10 cannot tell the two apart, so there it is taken as ours."""
    task = asyncio.current_task()
    return task is not None and getattr(task, "cancelling", lambda: 1)() == 0


class _AttemptFailed(Exception):
    def __init__(self, detail: str, counts_against_worker: bool = True):
        super().__init__(detail)
        self.counts_against_worker = counts_against_worker


class Dispatcher:
    """Sends requests to workers chosen by admission and the model's policy; retries and resumes on failure."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policies: ModelPolicies,
        admission: Admission,
        retry: RetryPolicy | None = None,
        metrics: GatewayMetrics | None = None,
        sessions: SessionTable | None = None,
    ):
        self.registry = registry
        self.sessions = sessions or SessionTable(registry)
        self.metrics = metrics or GatewayMetrics()
        self.policies = policies
        self.admission = admission
        self.retry = retry or RetryPolicy()
        self.retries = 0
        """Attempts that failed before their first token and were retried."""
        self.failovers = 0
        """Attempts that failed after tokens were sent and were resumed elsewhere."""
        self._calls = itertools.count(1)
        self._instance = secrets.token_hex(4)
        """With ``_calls``, makes each call's engine request id unique, even when clients reuse an X-Request-Id and
        several gateways send to the same worker (each numbers its calls from 1)."""
        self._background: set[asyncio.Task[None]] = set()

    async def generate(
        self,
        model: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        priority: int = 0,
        affinity_key: str | None = None,
        trace: Trace | None = None,
        session: str | None = None,
    ) -> AsyncIterator[tuple[WorkerRecord, pb.GenerateChunk]]:
        """Stream (worker, chunk) pairs until a chunk carries a finish reason.

        Chunks count output tokens from the start of the request, whichever worker made them. Closing the
        iterator early cancels the current call, which aborts the request on its worker. ``session``: the
        conversation session's key (see :mod:`fleetserve.gateway.sessions`): the turn goes to the worker holding it.
        """
        progress = _Progress(RouteRequest(model, request_id, prompt, affinity_key), trace)
        tokens = self.admission.tokens_needed(len(prompt), params.max_tokens)
        proto_params = convert.sampling_to_proto(params)
        avoid: set[str] = set()
        attempt_no = 0
        while True:
            handoff = self._route(progress, session)
            lease, attempt = await self._admit(progress, tokens, priority, avoid, attempt_no)
            worker = lease.worker
            prefill_only = progress.route.pool == PREFILL_ROLE
            request = pb.GenerateRequest(
                request_id=f"{request_id}-{self._instance}.{next(self._calls)}",
                prompt_token_ids=prompt,
                params=proto_params,
                priority=priority,
                resumed_output_ids=progress.sent,
                session_id=session or "",  # a prefill worker checks the session's limits; the decode worker pins it
                prefill_only=prefill_only,
                kv_source=handoff,
            )
            progress.produced = 0
            try:
                async with contextlib.aclosing(self._attempt(progress, worker, request, attempt)) as chunks:
                    async for chunk in chunks:
                        if chunk.finish_reason == PREFILLED:  # on to a decode worker, which fetches the KV
                            chunk.finish_reason = ""
                            progress.handoff = pb.KvSource(
                                address=worker.info.address, transfer_id=request.request_id, num_tokens=len(prompt)
                            )
                            yield worker, chunk
                            break
                        if chunk.finish_reason and session:  # first: the caller may stop reading at the last chunk
                            self._session_turn_done(session, model, worker)
                        yield worker, chunk
                        if chunk.finish_reason:
                            return
            except _AttemptFailed as failure:
                lease.release()  # before the backoff: the slot and reservation are free for others meanwhile
                attempt_no += 1
                self._after_failure(progress, worker, attempt, failure, attempt_no)
                avoid.add(worker.worker_id)
                await asyncio.sleep(self.retry.delay(attempt_no))
            except BaseException as exc:
                if attempt and attempt.ended is None:
                    attempt.tokens = progress.produced
                    trace.end_attempt(attempt, "error" if isinstance(exc, Exception) else "cancelled", str(exc))
                raise
            finally:
                lease.release()

    async def _admit(
        self, progress: _Progress, tokens: int, priority: int, avoid: set[str], attempt_no: int
    ) -> tuple[Lease, Attempt | None]:
        """A lease for attempt ``attempt_no`` (0: the first) of a request, its queue time in the metrics (the first
        attempt's) and the trace (a queue span, and the attempt begun on the leased worker)."""
        trace, model = progress.trace, progress.route.model
        queue_start = trace.elapsed() if trace else 0.0
        lease = await self.admission.acquire(model, progress.route, tokens, priority, avoid, accepted=attempt_no > 0)
        if attempt_no == 0:
            self.metrics.queue_time_seconds.labels(model=model).observe(lease.queued_s)
        attempt = None
        if trace:
            worker = lease.worker
            trace.add_span("queue", queue_start, attempt=attempt_no + 1)
            attempt = trace.begin_attempt(worker.name, worker.info.address, len(progress.sent), lease.queued_s)
        return lease, attempt

    async def embed(
        self, model: str, request_id: str, inputs: list[list[int]], trace: Trace | None = None
    ) -> tuple[WorkerRecord, pb.EmbedReply]:
        """Embed ``inputs`` (token ids, special tokens included) on one of the model's workers, chosen by admission
        and the model's policy like a generation; a worker that fails is retried elsewhere."""
        progress = _Progress(RouteRequest(model, request_id, inputs[0]), trace)
        tokens = sum(len(i) for i in inputs)
        avoid: set[str] = set()
        attempt_no = 0
        while True:
            lease, attempt = await self._admit(progress, tokens, 0, avoid, attempt_no)
            worker = lease.worker
            request = pb.EmbedRequest(
                request_id=f"{request_id}-{self._instance}.{next(self._calls)}",
                inputs=[pb.TokenIds(ids=ids) for ids in inputs],
            )
            try:
                reply = await self._embed_attempt(worker, request, request_id)
                if attempt:
                    trace.end_attempt(attempt, "finished")
                return worker, reply
            except _AttemptFailed as failure:
                lease.release()
                attempt_no += 1
                self._after_failure(progress, worker, attempt, failure, attempt_no)
                avoid.add(worker.worker_id)
                await asyncio.sleep(self.retry.delay(attempt_no))
            except BaseException as exc:
                if attempt and attempt.ended is None:
                    trace.end_attempt(attempt, "error" if isinstance(exc, Exception) else "cancelled", str(exc))
                raise
            finally:
                lease.release()

    async def _embed_attempt(self, worker: WorkerRecord, request: pb.EmbedRequest, request_id: str) -> pb.EmbedReply:
        """One Embed call to one worker; _AttemptFailed when it fails in a way another worker may not."""
        if worker.stub is None:  # declared dead between admission and now
            raise _AttemptFailed("the worker left before the request was sent", counts_against_worker=False)
        try:
            reply = await worker.stub.Embed(request, metadata=(("x-request-id", request_id),))
        except grpc.aio.AioRpcError as exc:
            raise self._classify(worker, exc) from exc
        except asyncio.CancelledError:
            if not _cut_off_under_us():
                raise
            raise _AttemptFailed("the call was cut off (the worker left)", counts_against_worker=False) from None
        self.registry.record_success(worker)
        return reply

    def _route(self, progress: _Progress, session: str | None) -> pb.KvSource | None:
        """Where the next attempt goes: the session's worker when it is up; a decode worker after a prefill worker
        sent the first token (the KV source is returned); the prefill pool for a new request of a model with both
        pools; else any worker of the model."""
        route = progress.route
        holder = self.sessions.holder(session, route.model) if session else None
        route.prefer = holder.worker_id if holder is not None else None
        handoff, progress.handoff = progress.handoff, None
        if handoff is not None:
            route.pool = DECODE_ROLE
        elif not progress.sent and holder is None and self.disaggregated(route.model):
            route.pool = PREFILL_ROLE
        else:
            route.pool = None
        if session and not progress.sent and handoff is None:
            placement = "held" if holder is not None else "moved" if session in self.sessions else "new"
            self.metrics.session_turns_total.labels(model=route.model, placement=placement).inc()
        return handoff

    def disaggregated(self, model: str) -> bool:
        """Whether ``model`` has both a prefill and a decode worker up: its new requests are split between them."""
        return self.registry.any_routable(model, PREFILL_ROLE) and self.registry.any_routable(model, DECODE_ROLE)

    def _session_turn_done(self, session: str, model: str, worker: WorkerRecord) -> None:
        previous = self.sessions.record(session, model, worker)
        if previous is not None and previous.stub is not None:
            task = asyncio.get_running_loop().create_task(self._release_session(previous, session))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release_session(self, worker: WorkerRecord, session: str) -> None:
        """Tell the worker that held a session before it moved to let its copy go (best effort: its TTL frees it
        otherwise)."""
        try:
            await worker.stub.ReleaseSession(pb.SessionRequest(session_id=session), timeout=5)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            log.info("could not release session on %s: %s", worker.name, exc)

    async def _attempt(
        self, progress: _Progress, worker: WorkerRecord, request: pb.GenerateRequest, attempt: Attempt | None
    ) -> AsyncIterator[pb.GenerateChunk]:
        """One call to one worker: its chunks, until one carries a finish reason; _AttemptFailed when the call
        fails in a way another worker may not."""
        streams = worker.token_streams
        if streams is None:  # declared dead between admission and now
            raise _AttemptFailed("the worker left before the request was sent", counts_against_worker=False)
        trace = progress.trace
        chunks = streams.chunks(request, progress.route.request_id)
        try:
            async for chunk in chunks:
                if progress.produced == 0:
                    self._first_chunk(progress, worker, chunk, attempt)
                progress.produced += len(chunk.token_ids)
                progress.sent.extend(chunk.token_ids)
                chunk.num_cached_tokens = progress.cached_tokens  # usage reports the first placement's cache hit
                if chunk.finish_reason:  # recorded first: the caller may stop reading at the last chunk
                    self.registry.record_success(worker)
                    if attempt:
                        attempt.tokens = progress.produced
                        trace.end_attempt(attempt, "prefilled" if chunk.finish_reason == PREFILLED else "finished")
                yield chunk
                if chunk.finish_reason:
                    return
            raise _AttemptFailed("the stream ended without a finish reason")
        except grpc.aio.AioRpcError as exc:
            raise self._classify(worker, exc) from exc
        except asyncio.CancelledError:
            if not _cut_off_under_us():
                raise  # this request was cancelled (its client left)
            # The call was cut off under us: the worker was declared dead and its channel closed.
            raise _AttemptFailed("the call was cut off (the worker left)", counts_against_worker=False) from None
        finally:
            await chunks.aclose()  # aborts the request on the worker when it has not finished

    def _first_chunk(
        self, progress: _Progress, worker: WorkerRecord, chunk: pb.GenerateChunk, attempt: Attempt | None
    ) -> None:
        """Prefill and first-token spans, and the first placement's prefix-cache hit against the prediction."""
        trace = progress.trace
        if attempt:
            trace.add_span(
                "prefill",
                attempt.started,
                worker=worker.name,
                worker_queue_s=round(chunk.queue_s, 6),
                worker_first_token_s=round(chunk.first_token_s, 6),
                cached_tokens=chunk.num_cached_tokens,
                resumed_tokens=len(progress.sent),
                **({"hops": [hop_json(h) for h in chunk.prefill_hops]} if chunk.prefill_hops else {}),
            )
            if not progress.sent:
                now = trace.elapsed()
                trace.add_span("first_token", now, now)
        if chunk.HasField("kv_received"):
            self._kv_received(progress, worker, chunk.kv_received, attempt)
        if progress.cached_tokens is None:
            progress.cached_tokens = chunk.num_cached_tokens
            route = progress.route
            self._record_prediction(route.model, route.predicted_cached_tokens, progress.cached_tokens)

    def _kv_received(
        self, progress: _Progress, worker: WorkerRecord, kv: pb.KvReceived, attempt: Attempt | None
    ) -> None:
        """A decode worker's account of the KV it fetched: metrics, and a span in the trace."""
        model = progress.route.model
        outcome = "fallback" if kv.fallback else "imported"
        self.metrics.kv_transfers_total.labels(model=model, outcome=outcome).inc()
        self.metrics.kv_transfer_bytes_total.labels(model=model).inc(kv.bytes)
        if not kv.fallback:
            self.metrics.kv_transfer_seconds.labels(model=model).observe(kv.seconds)
        if attempt:
            progress.trace.add_span(
                "kv_transfer",
                attempt.started,
                attempt.started + kv.seconds,
                worker=worker.name,
                tokens=kv.tokens,
                cached_tokens=kv.cached_tokens,
                bytes=kv.bytes,
                **({"fallback": kv.fallback} if kv.fallback else {}),
            )

    def _after_failure(
        self, progress: _Progress, worker: WorkerRecord, attempt: Attempt | None, failure: _AttemptFailed, n: int
    ) -> None:
        """Count and log attempt ``n``'s failure; raise UpstreamError when no retry is left."""
        model, request_id, sent = progress.route.model, progress.route.request_id, progress.sent
        detail = f"worker {worker.name} failed: {failure}"
        if failure.counts_against_worker:
            self.registry.record_failure(worker, str(failure))
        outcome = "error" if n > self.retry.max_retries else "failed_over" if sent else "retried"
        if attempt:
            attempt.tokens = progress.produced
            progress.trace.end_attempt(attempt, outcome, str(failure))
        if outcome == "error":
            log.warning("request %s failed after %d attempts: %s", request_id, n, detail)
            raise UpstreamError(f"{detail} (after {n} attempts)") from None
        if sent:
            self.failovers += 1
            self.metrics.failovers_total.labels(model=model).inc()
            log.warning("request %s: %s after %d tokens; resuming elsewhere", request_id, detail, len(sent))
        else:
            self.retries += 1
            self.metrics.retries_total.labels(model=model).inc()
            log.warning("request %s: %s before its first token; retrying", request_id, detail)

    def _classify(self, worker: WorkerRecord, exc: grpc.aio.AioRpcError) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequestError(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return CapacityError(details)
        if code in RETRYABLE:
            # A draining worker refusing new work is not a fault; neither is a call we cut because the worker
            # was already declared dead (its failure was counted when it was).
            fault = not (
                (code == grpc.StatusCode.UNAVAILABLE and "draining" in details) or worker.state == WorkerState.DEAD
            )
            return _AttemptFailed(f"{code.name}: {details}", counts_against_worker=fault)
        return UpstreamError(f"worker {worker.name} failed: {code.name}: {details}")

    def _record_prediction(self, model: str, predicted: int, actual: int) -> None:
        self.metrics.prefix_cache_predicted_tokens_total.labels(model=model).inc(predicted)
        self.metrics.prefix_cache_hit_tokens_total.labels(model=model).inc(actual)
        self.policies.policy(model).record_actual(predicted, actual)
