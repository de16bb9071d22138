"""Keeps named children running: starts a crashed one again after a growing backoff, gives up on a crash loop.

A :class:`Keeper` owns a restart state per child it keeps, and advances all of them in :meth:`Keeper.tick`, one
pass that never sleeps: called from the keeper's own thread (:meth:`Keeper.start_thread`) or from a caller's event
loop. An exit nobody asked for is a crash (a clean exit, code 0, is not, unless the policy says otherwise); the
child starts again once its backoff has passed, the backoff growing with each crash that follows a short run. So
many crashes within a window make the child "crash-looping": it is not started again until :meth:`Keeper.reset`.
An exit that :meth:`Keeper.release` (or :meth:`Child.stop <fleetserve.supervisor.child.Child.stop>`) caused is
never a crash. What the keeper does is logged and passed to an optional ``on_event`` callback as a
:class:`KeeperEvent`; :meth:`Keeper.status` says where each child stands. Time comes from an injected clock, so
tests can check the arithmetic without waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.supervisor.child import DEFAULT_GRACE_S, DRAIN_S, Child, ChildSpec
from fleetserve.supervisor.children import Supervisor

log = logging.getLogger(__name__)

LAST_LINES = 20
"""Output lines of a crashed run that its status and events carry."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a kept child is started again after it exits, and when the keeper gives up on it."""

    initial_backoff_s: float = 1.0
    """The wait before starting a child again after its first crash (or after a crash that ended a stable run)."""
    max_backoff_s: float = 30.0
    factor: float = 2.0
    """Each crash that follows a short run multiplies the backoff by this much, up to ``max_backoff_s``."""
    crash_loop_crashes: int = 5
    crash_loop_window_s: float = 120.0
    """``crash_loop_crashes`` crashes within this many seconds: the child is crash-looping and not started again."""
    stable_s: float = 60.0
    """A run that lasted this long before its crash sets the backoff back to ``initial_backoff_s``."""
    restart_clean_exit: bool = False
    """Whether an exit with code 0 that nobody asked for is started again too (and counted as a crash)."""

    def __post_init__(self) -> None:
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("RestartPolicy needs 0 <= initial_backoff_s <= max_backoff_s")
        if self.factor < 1:
            raise ValueError(f"RestartPolicy.factor must be at least 1 (not {self.factor})")
        if self.crash_loop_crashes < 1 or self.crash_loop_window_s < 0 or self.stable_s < 0:
            raise ValueError("RestartPolicy needs crash_loop_crashes >= 1, crash_loop_window_s >= 0, stable_s >= 0")

    def backoff(self, consecutive_crashes: int) -> float:
        """The wait before the next start after ``consecutive_crashes`` crashes in a row (1 for the first)."""
        try:
            wait = self.initial_backoff_s * self.factor ** (max(1, consecutive_crashes) - 1)
        except OverflowError:
            return self.max_backoff_s
        return min(self.max_backoff_s, wait)


@dataclass
class KeeperEvent:
    """Something the keeper noticed or did about one child."""

    name: str
    kind: str
    """One of: "crashed" (it will start again after its backoff), "restarted", "crash-looping" (it crashed once too
    often and will not start again until reset; this event stands for that last crash too) or "exited" (a clean
    exit, not started again)."""
    detail: str
    """What happened, as words that follow the child's name: "exited with code 3 after 0.4s; starting it again in
    2s"."""
    exit_code: int | None = None
    """The exit code of the run that ended (negative: the signal that ended it); None for "restarted"."""
    lines: list[str] = field(default_factory=list)
    """The last output lines of the run that ended (without their newlines)."""


@dataclass
class KeptStatus:
    """Where a kept child stands."""

    name: str
    state: str
    """One of: "starting" (launched, its ready line not seen yet), "running" (ready, or it has no ready pattern),
    "backoff" (waiting to start again), "crash-looping", "exited" (a clean exit, not started again) or "stopped"
    (released, or stopped by a direct call to its Child)."""
    pid: int | None
    """The process's id while it is starting or running, else None."""
    restarts: int
    """How many times it was started again after its first start."""
    crashes: int
    """Its crashes within the policy's crash-loop window."""
    last_exit_code: int | None
    """The code of its latest exit that was not asked for (None before any)."""
    last_lines: list[str]
    """The last output lines of that run (without their newlines)."""
    next_start_in_s: float
    """The backoff left before it starts again; 0 when it is not waiting."""
    started_at: float
    """The keeper's clock (time.monotonic() by default) at its latest start."""
    uptime_s: float
    """How long the current run has lasted; 0 when it is not running."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Kept:
    """The keeper's record of one child. ``state`` is "up" while a run is on (starting or running)."""

    child: Child
    policy: RestartPolicy
    started_at: float
    state: str = "up"
    consecutive: int = 0  # crashes since the latest stable run: the backoff's exponent
    crash_times: deque[float] = field(default_factory=deque)
    last_exit_code: int | None = None
    last_lines: list[str] = field(default_factory=list)
    next_start_at: float = 0.0
    exit_seen_at: float | None = None  # time.monotonic() when a tick first saw the exit, while its output drains

    def crashes(self, now: float) -> int:
        """The crashes within the window, forgetting the older ones."""
        while self.crash_times and now - self.crash_times[0] > self.policy.crash_loop_window_s:
            self.crash_times.popleft()
        return len(self.crash_times)


class Keeper:
    """Keeps children running under a :class:`Supervisor`: see the module's docstring.

    Thread-safe: :meth:`tick` runs from one thread (its own or a caller's loop) while others keep, release, reset
    or read statuses. A child is started in the thread that calls :meth:`keep` or :meth:`reset`, and started again
    in the thread that calls :meth:`tick`: mind that for a child with ``exit_with_parent``."""

    def __init__(
        self,
        supervisor: Supervisor | None = None,
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[KeeperEvent], None] | None = None,
    ):
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.policy, self.clock, self.on_event = policy, clock, on_event
        self._kept: dict[str, _Kept] = {}  # in the order they were kept
        self._lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self, spec: ChildSpec, policy: RestartPolicy | None = None) -> Child:
        """Start a child and keep it running (under ``policy``, else the keeper's). Its name may be that of a child
        that was released or exited cleanly, not of one kept otherwise; a start that fails raises (OSError)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the keeper is closed")
            old = self._kept.get(spec.name)
            if old is not None and old.state not in ("exited", "stopped"):
                raise ValueError(f"a child named {spec.name!r} is already kept")
            child = self.supervisor.start(spec)
            self._kept.pop(spec.name, None)
            self._kept[spec.name] = _Kept(child, policy or self.policy, self.clock())
        return child

    def release(self, name: str, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """Stop keeping a child and stop it (SIGTERM, SIGKILL after ``grace_s``); its exit code. Its status stays,
        as "stopped". Raises KeyError if no child of that name is kept."""
        with self._lock:
            kept = self._get(name)
            kept.state = "stopped"
        code = kept.child.stop(grace_s)
        log.info("%s released (exit code %s)", name, code)
        return code

    def reset(self, name: str) -> Child:
        """Forget a child's crashes and, unless it is running, start it again now (a crash-looping one too).
        Raises KeyError if no child of that name is kept, ValueError if it was released."""
        with self._lock:
            kept = self._get(name)
            if kept.state == "stopped":
                raise ValueError(f"{name} was released: keep it again instead")
            kept.crash_times.clear()
            kept.consecutive = 0
            event = self._start_again(kept, self.clock(), "after a reset") if kept.state != "up" else None
        if event is not None:
            self._emit(event)
        return kept.child

    def tick(self) -> list[KeeperEvent]:
        """One pass over the kept children, without sleeping: notice exits, start again those whose backoff is over;
        what happened, in order (each event also logged and passed to ``on_event``)."""
        with self._lock:
            if self._closed:
                return []
            now = self.clock()
            events = [event for kept in list(self._kept.values()) if (event := self._advance(kept, now))]
        for event in events:
            self._emit(event)
        return events

    def status(self, name: str) -> KeptStatus:
        """Raises KeyError if no child of that name is kept."""
        with self._lock:
            return self._status(self._get(name), self.clock())

    def statuses(self) -> list[KeptStatus]:
        """Every kept child's status, in the order they were kept."""
        with self._lock:
            now = self.clock()
            return [self._status(kept, now) for kept in self._kept.values()]

    def start_thread(self, interval_s: float = 0.2) -> threading.Thread:
        """Call :meth:`tick` every ``interval_s`` from a daemon thread of the keeper's own, until :meth:`close`."""
        with self._lock:
            if self._closed or self._thread is not None:
                raise RuntimeError("the keeper is closed or its thread already started")
            self._thread = threading.Thread(target=self._run, args=(interval_s,), name="keeper", daemon=True)
            self._thread.start()
            return self._thread

    def close(self, grace_s: float = DEFAULT_GRACE_S) -> dict[str, int | None]:
        """Release every kept child, the latest kept first, each before the next, then stop the thread; their exit
        codes by name, in stop order. Nothing is started again from here on."""
        with self._lock:
            self._closed = True  # tick() does nothing from here on
            names = list(reversed(self._kept))
        codes: dict[str, int | None] = {}
        for name in names:
            try:
                codes[name] = self.release(name, grace_s)
            except Exception:  # keep stopping the others
                log.exception("stopping %s failed", name)
                codes[name] = None
        # The thread ends only now: a child it started again gets SIGTERM when it ends, with exit_with_parent.
        self._closing.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        return codes

    def _run(self, interval_s: float) -> None:
        while not self._closing.wait(interval_s):
            try:
                self.tick()
            except Exception:  # the thread must outlive one bad pass
                log.exception("a keeper pass failed")

    def _get(self, name: str) -> _Kept:
        kept = self._kept.get(name)
        if kept is None:
            raise KeyError(f"no child named {name!r} is kept")
        return kept

    def _advance(self, kept: _Kept, now: float) -> KeeperEvent | None:
        """The event of one child's step this pass, if it took one."""
        if kept.state == "backoff" and now >= kept.next_start_at:
            return self._start_again(kept, now, "after its backoff")
        child = kept.child
        code = child.returncode
        if kept.state != "up" or code is None:
            return None
        if not child.join_output(0):  # its last lines may still be on their way: give them DRAIN_S
            if kept.exit_seen_at is None:
                kept.exit_seen_at = time.monotonic()
            if time.monotonic() - kept.exit_seen_at < DRAIN_S:
                return None
        kept.exit_seen_at = None
        if child.stop_requested:
            kept.state = "stopped"
            log.info("%s was stopped (exit code %s); not started again", child.name, code)
            return None
        lines = [line.rstrip("\n") for line in child.tail(LAST_LINES, this_run=True)]
        how = f"{describe_exit(code)} after {now - kept.started_at:.1f}s"
        if code == 0 and not kept.policy.restart_clean_exit:
            kept.state, kept.last_exit_code, kept.last_lines = "exited", code, lines
            return KeeperEvent(child.name, "exited", f"{how}; not started again", code, lines)
        stable = now - kept.started_at >= kept.policy.stable_s
        return self._crashed(kept, now, code, lines, how, stable, "starting it again")

    def _crashed(
        self, kept: _Kept, now: float, code: int | None, lines: list[str], how: str, stable: bool, again: str
    ) -> KeeperEvent:
        """Count a crash: into backoff, or crash-looping when the window holds too many."""
        policy, name = kept.policy, kept.child.name
        kept.last_exit_code, kept.last_lines = code, lines
        kept.consecutive = 1 if stable else kept.consecutive + 1
        kept.crash_times.append(now)
        crashes = kept.crashes(now)
        if crashes >= policy.crash_loop_crashes:
            kept.state = "crash-looping"
            detail = f"{how}: {crashes} crashes within {policy.crash_loop_window_s:g}s, not started again"
            return KeeperEvent(name, "crash-looping", detail, code, lines)
        wait = policy.backoff(kept.consecutive)
        kept.state, kept.next_start_at = "backoff", now + wait
        return KeeperEvent(name, "crashed", f"{how}; {again} in {wait:g}s", code, lines)

    def _start_again(self, kept: _Kept, now: float, why: str) -> KeeperEvent:
        child = kept.child
        try:
            child.launch()
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. its program is gone: a crash like any other
            how = f"could not be started again ({exc})"
            return self._crashed(kept, now, None, [str(exc)], how, False, "trying again")
        kept.state, kept.started_at = "up", now
        return KeeperEvent(child.name, "restarted", f"started again {why} (pid {child.pid})")

    def _status(self, kept: _Kept, now: float) -> KeptStatus:
        child, state = kept.child, kept.state
        up = state == "up"
        if up:
            state = "running" if child.spec.ready is None or child.ready_match is not None else "starting"
        return KeptStatus(
            name=child.name,
            state=state,
            pid=child.pid if up else None,
            restarts=child.restarts,
            crashes=kept.crashes(now),
            last_exit_code=kept.last_exit_code,
            last_lines=list(kept.last_lines),
            next_start_in_s=max(0.0, kept.next_start_at - now) if state == "backoff" else 0.0,
            started_at=kept.started_at,
            uptime_s=max(0.0, now - kept.started_at) if up else 0.0,
        )

    def _emit(self, event: KeeperEvent) -> None:
        if event.kind == "crash-looping":
            log.error("%s %s; its last lines:\n%s", event.name, event.detail, "\n".join(event.lines))
        else:
            log.log(logging.INFO if event.kind == "restarted" else logging.WARNING, "%s %s", event.name, event.detail)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a broken callback must not stop the keeping
                log.exception("the keeper's on_event failed on %s", event)


def describe_exit(code: int | None) -> str:
    """Words for an exit code: "exited with code 3", or "was killed by SIGKILL" for a negative one (the signal)."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    with contextlib.suppress(ValueError):
        return f"was killed by {signal.Signals(-code).name}"
    return f"was killed by signal {-code}"
