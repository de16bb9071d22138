"""Owns fleetserve's child processes: starting them, collecting their output, waiting until they are ready, stopping them.

Each child runs in a session (and so a process group) of its own, so stopping it reaches whatever it started too:
SIGTERM to the group, SIGKILL after a grace period, then SIGKILL to anything still left in the group. Its output
(stdout and stderr together) is read line by line by a background thread; the last ``max_lines`` lines are kept,
and each line can be echoed to a stream with a ``[name]`` prefix. A child is ready when a line matches its readiness
regex; waiting for that fails early, with the exit code and the last lines, if the child exits first.

A :class:`Child` record keeps the spec it was started from, so starting it again later is one more call on the same
record. This module imports neither torch nor the engine: the gateway uses it to launch local workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import TextIO

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
"""How long a stopped child has between SIGTERM and SIGKILL unless the caller says otherwise."""
TAIL_LINES = 30
"""Lines of output an error about a child carries."""
DRAIN_S = 1.0
"""After a child exits, how long its last lines may take to arrive before a wait gives up on them."""
POLL_S = 0.05


@dataclass
class ChildSpec:
    """Everything needed to start a child, and to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str | None] = field(default_factory=dict)
    """Added to this process's environment (None removes a variable); PYTHONUNBUFFERED=1 is always set so output
    arrives line by line."""
    ready: str | re.Pattern | None = None
    """Matched against each output line: the first match means the child is ready."""
    echo: TextIO | None = None
    """Each output line is also written here, prefixed with ``[name] ``."""
    cwd: str | None = None
    max_lines: int = 5000


class ChildExited(RuntimeError):
    """A child exited while something waited for it."""

    def __init__(self, name: str, returncode: int | None, lines: list[str]):
        self.name, self.returncode, self.lines = name, returncode, lines
        super().__init__(f"{name} exited with code {returncode}; its last lines:\n" + "".join(lines))


class ReadyTimeout(TimeoutError):
    """A child did not print what was waited for in time."""

    def __init__(self, name: str, timeout_s: float, lines: list[str]):
        self.name, self.timeout_s, self.lines = name, timeout_s, lines
        super().__init__(f"{name} was not ready after {timeout_s:g}s; its last lines:\n" + "".join(lines))


class Child:
    """One supervised child: its spec, its current process, its recent output and how often it was started again."""

    def __init__(self, spec: ChildSpec):
        self.spec = spec
        self.popen: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=spec.max_lines)
        """The last output lines, each ending in a newline; read them with :meth:`output` or :meth:`tail`."""
        self.restarts = 0
        """How many times the child was started again after its first start."""
        self.started_at: float | None = None
        """time.monotonic() of the latest start."""
        self.ready_match: re.Match | None = None
        """The first line of the current run that matched ``spec.ready``."""
        self._ready = re.compile(spec.ready) if isinstance(spec.ready, str) else spec.ready
        self._cond = threading.Condition()
        self._count = 0  # lines read so far, over every run
        self._first = 0  # the number of the current run's first line
        self._eof = False  # the current run's output has ended
        self._swept = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: the signal that ended it), else None."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def launch(self) -> Child:
        """Start the process (again, after it has exited); its output is collected from here on."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        spec = self.spec
        popen = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=_environment(spec.env),
            cwd=spec.cwd,
            start_new_session=True,
        )
        with self._cond:
            if self.popen is not None:
                self.restarts += 1
            self.popen, self.started_at, self.ready_match = popen, time.monotonic(), None
            self._first, self._eof, self._swept = self._count, False, False
        threading.Thread(target=self._pump, args=(popen,), name=f"output-{self.name}", daemon=True).start()
        log.debug("started %s (pid %d): %s", self.name, popen.pid, " ".join(spec.argv))
        return self

    def _pump(self, popen: subprocess.Popen) -> None:
        prefix = f"[{self.name}] "
        for line in popen.stdout:  # type: ignore[union-attr]
            if not line.endswith("\n"):
                line += "\n"
            with self._cond:
                self.lines.append(line)
                self._count += 1
                if self._ready is not None and self.ready_match is None and popen is self.popen:
                    self.ready_match = self._ready.search(line)
                self._cond.notify_all()
            if self.spec.echo is not None:
                with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: keep collecting
                    self.spec.echo.write(prefix + line)
                    self.spec.echo.flush()
        with contextlib.suppress(OSError):
            popen.stdout.close()  # type: ignore[union-attr]
        with self._cond:
            if popen is self.popen:
                self._eof = True
            self._cond.notify_all()

    def output(self) -> list[str]:
        """A copy of the kept output lines."""
        with self._cond:
            return list(self.lines)

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        """The last ``n`` output lines."""
        with self._cond:
            return list(itertools.islice(self.lines, max(0, len(self.lines) - n), None))

    def join_output(self, timeout_s: float = DRAIN_S) -> bool:
        """Wait until the current run's output has ended (every line collected); False if it has not by then."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eof, timeout_s)

    def _since(self, cursor: int) -> tuple[list[str], int]:
        """The kept lines after line number ``cursor``, and the number to read from next time."""
        with self._cond:
            cursor = max(cursor, self._first)
            new = min(self._count - cursor, len(self.lines))
            return list(itertools.islice(self.lines, len(self.lines) - new, None)) if new > 0 else [], self._count

    def wait_for(self, pattern: str | re.Pattern, timeout_s: float = 120.0) -> re.Match:
        """The first line of the current run matching ``pattern``, waiting for it if need be.

        Raises :class:`ChildExited` if the child exits without printing one, :class:`ReadyTimeout` after
        ``timeout_s``."""
        watch = _Watch(self, pattern, timeout_s)
        while (match := watch.step()) is None:
            with self._cond:
                if self._count == watch.cursor:  # nothing new: sleep until a line comes (or a while)
                    self._cond.wait(POLL_S)
        return match

    async def wait_for_async(self, pattern: str | re.Pattern, timeout_s: float = 120.0) -> re.Match:
        """:meth:`wait_for` for an event loop: it polls, so cancelling it stops the wait."""
        watch = _Watch(self, pattern, timeout_s)
        while (match := watch.step()) is None:
            await asyncio.sleep(POLL_S)
        return match

    def _ready_pattern(self) -> re.Pattern:
        if self._ready is None:
            raise ValueError(f"{self.name} has no readiness pattern")
        return self._ready

    def wait_ready(self, timeout_s: float = 120.0) -> re.Match:
        """The match of ``spec.ready`` (see :meth:`wait_for`)."""
        return self.ready_match or self.wait_for(self._ready_pattern(), timeout_s)

    async def wait_ready_async(self, timeout_s: float = 120.0) -> re.Match:
        return self.ready_match or await self.wait_for_async(self._ready_pattern(), timeout_s)

    def signal(self, sig: int, group: bool = True) -> bool:
        """Send ``sig`` to the child's process group (or to the child alone); False if it has already exited."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return False
        try:
            if group:
                os.killpg(popen.pid, sig)  # the child leads its own group: pgid == pid
            else:
                popen.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit code once the child has exited; None if it is still running after ``timeout_s``."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = DEFAULT_GRACE_S, sig: int = SIGTERM) -> int | None:
        """``sig`` to the group, SIGKILL if the child is still there after ``grace_s``, then SIGKILL to whatever is
        left in its group; the exit code. Stopping a stopped child only returns its code."""
        popen = self.popen
        if popen is None:
            return None
        if self.signal(sig):
            self.signal(SIGCONT)  # a paused (SIGSTOPped) child could not act on it otherwise
            if self.wait(grace_s) is None:
                log.warning("%s (pid %d) did not stop within %gs; killing it", self.name, popen.pid, grace_s)
                self.signal(SIGKILL)
        return self._reap(popen)

    async def stop_async(self, grace_s: float = DEFAULT_GRACE_S, sig: int = SIGTERM) -> int | None:
        """:meth:`stop` in a thread, for an event loop."""
        return await asyncio.to_thread(self.stop, grace_s, sig)

    def kill(self) -> int | None:
        """SIGKILL to the group at once; the exit code."""
        popen = self.popen
        if popen is None:
            return None
        self.signal(SIGKILL)
        return self._reap(popen)

    def _reap(self, popen: subprocess.Popen) -> int:
        """Wait for the child, then SIGKILL whatever it left in its group, once per run (the group's id cannot be
        reused while anything is left in it); the exit code."""
        popen.wait()
        with self._cond:
            sweep = not self._swept and popen is self.popen
            self._swept = self._swept or sweep
        if sweep:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, SIGKILL)
        return popen.returncode


class _Watch:
    """One wait for a pattern in a child's output, advanced by :meth:`step` (from a thread or an event loop)."""

    def __init__(self, child: Child, pattern: str | re.Pattern, timeout_s: float):
        if child.popen is None:
            raise RuntimeError(f"{child.name} was never started")
        self.child, self.timeout_s = child, timeout_s
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.deadline = time.monotonic() + timeout_s
        self.cursor = 0  # _since starts at the current run's first line
        self.exited_at: float | None = None

    def step(self) -> re.Match | None:
        """The match if the lines read so far have one; raises if the child has exited or time is up."""
        child, now = self.child, time.monotonic()
        finished = False
        if child.returncode is not None:
            if self.exited_at is None:
                self.exited_at = now
            finished = child._eof or now - self.exited_at >= DRAIN_S  # decided before reading: no line is missed
        lines, self.cursor = child._since(self.cursor)
        for line in lines:
            match = self.pattern.search(line)
            if match:
                return match
        if finished:
            raise ChildExited(child.name, child.returncode, child.tail())
        if now >= self.deadline:
            raise ReadyTimeout(child.name, self.timeout_s, child.tail())
        return None


class Supervisor:
    """The children started through it, by name and in start order; stops them all in reverse order."""

    def __init__(self) -> None:
        self._children: dict[str, Child] = {}
        self._lock = threading.Lock()

    def start(self, spec: ChildSpec) -> Child:
        """Start a child; its name must not be that of a running one (an exited one's record is replaced)."""
        child = Child(spec)
        with self._lock:
            old = self._children.get(spec.name)
            if old is not None and old.running:
                raise ValueError(f"a child named {spec.name!r} is already running")
            self._children.pop(spec.name, None)
            self._children[spec.name] = child
        try:
            return child.launch()
        except BaseException:
            self.discard(spec.name)
            raise

    def get(self, name: str) -> Child | None:
        return self._children.get(name)

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    def __contains__(self, name: object) -> bool:
        return name in self._children

    def __iter__(self) -> Iterator[Child]:
        with self._lock:
            return iter(list(self._children.values()))

    def __len__(self) -> int:
        return len(self._children)

    def discard(self, name: str) -> Child | None:
        """Forget a child's record (it is not stopped)."""
        with self._lock:
            return self._children.pop(name, None)

    def exited(self) -> list[Child]:
        """The children that were started and are no longer running."""
        return [c for c in self if c.popen is not None and not c.running]

    def _watches(self, names: Iterable[str] | None, timeout_s: float) -> tuple[dict[str, re.Match], list[_Watch]]:
        children = list(self) if names is None else [self[n] for n in names]
        found = {c.name: c.ready_match for c in children if c.ready_match is not None}
        pending = [_Watch(c, c._ready, timeout_s) for c in children if c._ready is not None and c.name not in found]
        return found, pending

    @staticmethod
    def _advance(found: dict[str, re.Match], pending: list[_Watch]) -> list[_Watch]:
        still = []
        for watch in pending:
            match = watch.step()
            if match is None:
                still.append(watch)
            else:
                found[watch.child.name] = match
        return still

    def wait_ready(self, timeout_s: float = 120.0, names: Iterable[str] | None = None) -> dict[str, re.Match]:
        """Wait for every child (or those named) that has a readiness pattern, all at once; their matches by name.
        The first to exit or time out raises (:class:`ChildExited`, :class:`ReadyTimeout`)."""
        found, pending = self._watches(names, timeout_s)
        while pending := self._advance(found, pending):
            time.sleep(POLL_S)
        return found

    async def wait_ready_async(
        self, timeout_s: float = 120.0, names: Iterable[str] | None = None
    ) -> dict[str, re.Match]:
        found, pending = self._watches(names, timeout_s)
        while pending := self._advance(found, pending):
            await asyncio.sleep(POLL_S)
        return found

    def stop(self, name: str, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """Stop one child (see :meth:`Child.stop`); None if there is none of that name."""
        child = self.get(name)
        return child.stop(grace_s) if child is not None else None

    async def stop_async(self, name: str, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        child = self.get(name)
        return await child.stop_async(grace_s) if child is not None else None

    def stop_all(self, grace_s: float = DEFAULT_GRACE_S) -> dict[str, int | None]:
        """Stop every child, the last started first, each before the next; exit codes by name, in stop order."""
        codes: dict[str, int | None] = {}
        for child in reversed(list(self)):
            try:
                codes[child.name] = child.stop(grace_s)
            except Exception:  # keep stopping the others
                log.exception("stopping %s failed", child.name)
                codes[child.name] = None
        return codes

    async def stop_all_async(self, grace_s: float = DEFAULT_GRACE_S) -> dict[str, int | None]:
        return await asyncio.to_thread(self.stop_all, grace_s)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``changes`` applied (None removes) and unbuffered Python output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
