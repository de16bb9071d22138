"""A set of children by name, in start order: start one, wait until all are ready, stop them all in reverse order."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator

from fleetserve.supervisor.child import DEFAULT_GRACE_S, POLL_S, Child, ChildSpec, _Watch

log = logging.getLogger(__name__)


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
