"""One child process: starting it (again), collecting its output, waiting until it is ready, stopping it.

Each child runs in a session (and so a process group) of its own, so stopping it reaches whatever it started too:
SIGTERM to the group, SIGKILL after a grace period, then SIGKILL to anything still left in the group. Its output
(stdout and stderr together) is read line by line by a background thread; the last ``max_lines`` lines are kept,
each line can be echoed to a stream with a ``[name]`` prefix and appended to a log file rotated by size. A child is
ready when a line matches its readiness regex; waiting for that fails early, with the exit code and the last lines,
if the child exits first. On Linux a child can be made to get SIGTERM when its parent dies.

A :class:`Child` record keeps the spec it was started from, so starting it again later is one more call on the same
record.
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
from dataclasses import dataclass, field
from datetime import datetime
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import TextIO

from fleetserve.supervisor.logfile import RotatingLog
from fleetserve.supervisor.parent_death import parent_death_env

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
    log_file: str | os.PathLike[str] | None = None
    """Each output line is also appended to this file (its folder is made if need be), the lines of every run of
    the child, each run after a line ``--- started (pid N) at <ISO time> ---``. A write error is logged once and
    does not stop the collection of the output."""
    log_max_bytes: int = 10 * 2**20
    """The log file is rotated before it would grow past this size, ..."""
    log_backups: int = 3
    """... into ``<log_file>.1`` (the newest) to ``<log_file>.<log_backups>``; with 0 it starts over, empty."""
    exit_with_parent: bool = False
    """On Linux the child gets SIGTERM when its parent dies (PR_SET_PDEATHSIG); elsewhere this is ignored. The child
    asks for it itself (``parent_death``): every ``fleetserve`` command does; another program must call
    ``honour_parent_death()``. The kernel ties this to the *thread* that started the child, not the process: start
    such a child from a thread that lives as long as the process (the main thread, an event loop's, a Keeper's own
    thread), or it gets SIGTERM when that thread ends. What the child starts in turn is not covered: it is up to
    the child to stop them on SIGTERM."""


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
        self._stop_requested = False  # stop() or kill() was called on the current run
        self._pump_thread: threading.Thread | None = None
        self._log = RotatingLog(spec.log_file, spec.log_max_bytes, spec.log_backups) if spec.log_file else None

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

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`stop` or :meth:`kill` was called since the latest start: an exit then was asked for."""
        return self._stop_requested

    def launch(self) -> Child:
        """Start the process (again, after it has exited); its output is collected from here on."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        if self._pump_thread is not None:  # the previous run's last lines come before this run's
            self._pump_thread.join(DRAIN_S)
        spec = self.spec
        popen = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=_environment({**spec.env, **(parent_death_env(SIGTERM) if spec.exit_with_parent else {})}),
            cwd=spec.cwd,
            start_new_session=True,
        )
        with self._cond:
            if self.popen is not None:
                self.restarts += 1
            self.popen, self.started_at, self.ready_match = popen, time.monotonic(), None
            self._first, self._eof, self._swept, self._stop_requested = self._count, False, False, False
        if self._log is not None:
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            self._log.write(f"--- started (pid {popen.pid}) at {started} ---\n")
        self._pump_thread = threading.Thread(target=self._pump, args=(popen,), name=f"output-{self.name}", daemon=True)
        self._pump_thread.start()
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
            if self._log is not None:
                self._log.write(line)
        with contextlib.suppress(OSError):
            popen.stdout.close()  # type: ignore[union-attr]
        if self._log is not None:
            self._log.close()  # no file held open between runs; the next start opens it again
        with self._cond:
            if popen is self.popen:
                self._eof = True
            self._cond.notify_all()

    def output(self) -> list[str]:
        """A copy of the kept output lines."""
        with self._cond:
            return list(self.lines)

    def tail(self, n: int = TAIL_LINES, this_run: bool = False) -> list[str]:
        """The last ``n`` output lines (of the latest run only, with ``this_run``)."""
        with self._cond:
            kept = min(len(self.lines), self._count - self._first) if this_run else len(self.lines)
            return list(itertools.islice(self.lines, len(self.lines) - min(n, kept), None))

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
        self._stop_requested = True
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
        self._stop_requested = True
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


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``changes`` applied (None removes) and unbuffered Python output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
