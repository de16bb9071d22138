"""AsyncEngine: the LLMEngine on its own thread, with per-request async streams for asyncio servers (``generate``),
or per-request callbacks that take all of a step's outputs in one turn of the event loop (``start``).

The engine thread builds the engine (``create``), then alternates between running queued commands (add, abort,
export ...) and stepping the engine, so the event loop never waits for a step. Every engine call goes through that
thread: the engine itself needs no locks, and one thread runs all of its torch work (``torch_threads`` says why
that matters). Closing a request's stream early (client gone, task cancelled) aborts it before the next step.
A failed step ends only its requests' streams (EngineStepError); after ``unhealthy_after`` failed steps in a row
``health()`` reports the engine unhealthy until a step succeeds again.

With a ``stream_interval`` of N > 1, a request's outputs are handed on once they hold N new tokens (its first
output and its last at once), so that a stream of one token per step costs the server's per-message work once
every N steps: each step's outputs are gathered on the engine thread, and a step with nothing due wakes nobody.
No token is held past ``stream_max_wait_s`` as far as the last step's time tells: gathered tokens go on at the
step after which waiting for the next would keep the oldest longer. Slow steps (a large batch) thus send every
token, as the per-token work is then small beside the step, and quick ones (a few sequences) gather. Given no
interval (None), the engine takes its device's default once built: groups on CPU, every token on CUDA
(``default_stream_interval``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fleetserve.config import EngineConfig
from fleetserve.contract import EngineStats, KVTransfer, RequestOutput, SamplingParams
from fleetserve.engine.engine import LLMEngine
from fleetserve.errors import EngineStepError, FleetServeError

log = logging.getLogger(__name__)
T = TypeVar("T")
Sink = Callable[[RequestOutput | BaseException], None]
"""Takes a request's outputs, or the exception that ends it, on the event loop (``AsyncEngine.start``)."""

PIN_CHECK_S = 1.0
"""How often an idle engine thread looks for pinned KV past its TTL."""

CPU_STREAM_INTERVAL = 4
"""The stream interval a server's engine takes on CPU unless told otherwise (``default_stream_interval``)."""


def default_stream_interval(device_type: str) -> int:
    """Tokens a server gathers per message by default on a device of this type: on CPU, where the per-message
    work of the worker, the gateway and the client runs on the cores the model's own threads fill, groups of 4
    (what they cost and save: docs/benchmarks.md, "Tokens sent in groups"); on CUDA, where the model runs on the
    device and the host's cores have room for that work, every token as it comes."""
    return 1 if device_type == "cuda" else CPU_STREAM_INTERVAL


class EngineDeadError(FleetServeError):
    """The engine thread has stopped (closed, or a fault outside any step); the request cannot go on."""


class AsyncEngine:
    """Async front of one LLMEngine; create it inside a running event loop or pass the loop.

    ``engine`` is the LLMEngine, or a function that builds it, called on the engine thread (``create``).
    """

    engine: LLMEngine

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        loop: asyncio.AbstractEventLoop | None = None,
        unhealthy_after: int = 3,
        stream_interval: int | None = 1,
        stream_max_wait_s: float = 0.1,
    ):
        self.unhealthy_after = unhealthy_after
        """Consecutive failed steps after which ``health()`` reports the engine unhealthy."""
        if stream_interval is not None and stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, not {stream_interval}")
        self.stream_interval = stream_interval
        """New tokens a request's outputs gather before they are handed on (its first and last go at once); given
        as None, ``default_stream_interval`` for the engine's device, set once it is built."""
        self.stream_max_wait_s = stream_max_wait_s
        """Longest a gathered token waits to be handed on, as far as step times tell."""
        self._held: dict[str, tuple[float, RequestOutput]] = {}
        """Outputs gathered towards the stream interval and when their oldest token came, by request (the engine
        thread's alone)."""
        self._step_s = 0.0
        """How long the latest step took (the engine thread's)."""
        self._loop = loop or asyncio.get_running_loop()
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future] | None] = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        """Where each request's outputs go, on the event loop: registered on the engine thread when it is added."""
        self._built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        build = None
        if isinstance(engine, LLMEngine):
            self._adopt(engine)
        else:
            build = engine
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build,), name="fleetserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def create(cls, config: EngineConfig | None = None, progress: bool = True, **options: Any) -> AsyncEngine:
        """Start the engine thread, build the engine on it (loading the model off the event loop) and return once
        it serves; a failed build raises here. ``options``: the constructor's (stream interval and wait)."""
        engine = cls(lambda: LLMEngine(config, progress), **options)
        await asyncio.wrap_future(engine._built)
        return engine

    # -- public API --------------------------------------------------------------------------------------

    async def start(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        kv_import: KVTransfer | None = None,
        retain_kv: bool = False,
        resumed_output: list[int] | None = None,
        session_id: str | None = None,
        session_ttl_s: float | None = None,
        prefill_only: bool = False,
        *,
        sink: Sink,
    ) -> str:
        """Add a request and return its id; bad input raises here. ``sink`` is called on the event loop with
        each of its outputs as a step gives it (all of a step's outputs in one turn of the loop, no task woken
        for each), or with the exception that ends it; it is forgotten after the finished output. A caller that
        stops listening before that calls ``drop``."""

        def add() -> str:
            rid = self.engine.add_request(
                prompt_token_ids,
                params,
                request_id,
                priority,
                retain_kv,
                kv_import,
                resumed_output,
                session_id,
                session_ttl_s,
                prefill_only,
            )
            self._sinks[rid] = sink  # registered on the engine thread before its first step
            return rid

        return await self.call(add)

    def drop(self, request_id: str, abort: bool) -> None:
        """Stop handing the request's outputs to its sink, and abort it first when ``abort``."""
        if abort:
            self._submit(lambda: self.engine.abort(request_id))
        self._submit(lambda: (self._sinks.pop(request_id, None), self._held.pop(request_id, None)))

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | None = None, **options: Any
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step until it finishes; bad input raises before the first.
        ``options``: ``start``'s (request id, priority, KV to import or retain, resumed output, session,
        prefill only)."""
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        rid = await self.start(prompt_token_ids, params, sink=stream.put_nowait, **options)
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.drop(rid, abort=not finished)

    async def abort(self, request_id: str) -> bool:
        """Abort a request by id; True if it was running or waiting."""
        out = await self.call(lambda: self._abort_held(request_id))
        if out is not None:
            self._deliver([out])
        return out is not None

    async def export_kv(self, request_id: str, start: int = 0, end: int | None = None) -> KVTransfer:
        return await self.call(lambda: self.engine.export_kv(request_id, start, end))

    async def release(self, request_id: str) -> None:
        await self.call(lambda: self.engine.release(request_id))

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (no waiting on the engine thread)."""
        return self._stats

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the engine thread between two steps, without waiting for it (usable where awaiting is
        not: cleanup of a cancelled task); its errors are logged."""
        fut = self._submit(fn)
        fut.add_done_callback(lambda f: f.exception() and log.warning("engine command failed: %s", f.exception()))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps and return its result."""
        return await asyncio.wrap_future(self._submit(fn))

    async def close(self) -> None:
        """Stop the engine thread; unfinished streams end with EngineDeadError."""
        if not self._stopped.is_set():
            self._commands.put(None)
            await asyncio.to_thread(self._thread.join)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> str | None:
        """None while the engine serves; otherwise why not (stopped, or its recent steps all failed)."""
        if not self.alive:
            return "engine stopped"
        failed = self.engine.consecutive_failed_steps
        if failed >= self.unhealthy_after:
            return f"the last {failed} engine steps failed: {self.engine.last_step_error}"
        return None

    # -- engine thread -----------------------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            fut.set_exception(EngineDeadError("the engine has stopped"))
        else:
            self._commands.put((fn, fut))
        return fut

    def _adopt(self, engine: LLMEngine) -> None:
        self.engine = engine
        if self.stream_interval is None:
            self.stream_interval = default_stream_interval(engine.runner.device.type)
        self._stats = engine.stats()
        self._built.set_result(engine)

    def _run(self, build: Callable[[], LLMEngine] | None) -> None:
        if build is not None:
            try:
                self._adopt(build())
            except BaseException as exc:  # raised by create(); nothing else has started
                self._built.set_exception(exc)
                self._stopped.set()
                return
        try:
            while True:
                block = not self.engine.has_unfinished()
                if not self._run_commands(block, PIN_CHECK_S if len(self.engine.pins) else None):
                    return
                if block and len(self.engine.pins):  # idle: pinned KV still expires on time
                    self.engine.pins.expire()
                if self.engine.has_unfinished():
                    began = time.monotonic()
                    try:
                        outputs = self.engine.step()
                    except EngineStepError as exc:  # the engine dropped that step's requests: end their streams
                        for rid in exc.request_ids:
                            self._held.pop(rid, None)
                        self._loop.call_soon_threadsafe(self._fail_requests, exc)
                        outputs = []
                    self._stats = self.engine.stats()
                    self._step_s = time.monotonic() - began
                    if outputs and self.stream_interval > 1:
                        outputs = self._due(outputs)
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as exc:  # a fault outside a step's requests: every waiting stream must hear of it
            log.exception("engine thread failed; stopping the engine")
            self._fail_all(EngineDeadError(f"the engine failed: {exc}"))
            raise
        finally:
            self._stopped.set()
            self._fail_all(EngineDeadError("the engine has stopped"))

    def _run_commands(self, block: bool, timeout: float | None = None) -> bool:
        """Run queued commands (waiting for one if ``block``, at most ``timeout`` seconds); False when told to
        stop."""
        while True:
            try:
                item = self._commands.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            if item is None:
                return False
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # delivered to the caller, who owns the error
                    fut.set_exception(exc)
            self._stats = self.engine.stats()
            block = False

    def _due(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Of a step's outputs, joined to what their requests had gathered, those due to be handed on: a
        request's first output, its last and any holding ``stream_interval`` new tokens; then whatever any
        request has gathered (this step's or an earlier one's, a preempted request's) whose oldest token would
        wait past ``stream_max_wait_s`` for another step like the last. The rest are kept."""
        due = []
        for out in outputs:
            since, out = self._join_held(out)
            if out.finished or len(out.new_token_ids) >= self.stream_interval or out.time == out.first_token_time:
                due.append(out)
            else:
                self._held[out.request_id] = (since, out)
        late = time.monotonic() + self._step_s - self.stream_max_wait_s  # a token older than this waited enough
        for rid, (since, out) in list(self._held.items()):
            if since <= late:
                del self._held[rid]
                due.append(out)
        return due

    def _join_held(self, out: RequestOutput) -> tuple[float, RequestOutput]:
        """``out`` after what its request had gathered (taken from the held ones), and when the oldest of those
        tokens came (``out``'s own time when nothing was held)."""
        held = self._held.pop(out.request_id, None)
        return (out.time, out) if held is None else (held[0], held[1].followed_by(out))

    def _abort_held(self, request_id: str) -> RequestOutput | None:
        """Abort the request; its final output carries what it had gathered (on the engine thread)."""
        out = self.engine.abort(request_id)
        if out is None:
            self._held.pop(request_id, None)
            return None
        return self._join_held(out)[1]

    def _hand(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._sinks.pop(request_id, None)
        try:
            sink(item)
        except Exception:  # one listener's fault is its own: the step's other requests still get theirs
            log.exception("the listener of request %s failed", request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._hand(out.request_id, out)

    def _fail_requests(self, exc: EngineStepError) -> None:
        for rid in exc.request_ids:  # one exception per request: each is raised in its own task
            self._hand(rid, EngineStepError(str(exc), [rid]))

    def _fail_all(self, exc: BaseException) -> None:
        def fail() -> None:
            for rid in list(self._sinks):
                self._hand(rid, exc)

        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fail)
        while True:  # commands nobody will run
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item[1].done():
                item[1].set_exception(exc)
