"""A child's log file: its output lines appended, rotated by size into numbered backups.

Rotation works as logging's RotatingFileHandler does (``name.1`` the newest backup, up to ``name.<backups>``), but
the file is written by the thread that reads the child's output, not through a logger. A write that fails (a full
disk, a folder removed) is logged once and dropped: collecting the output must go on whatever happens to the file.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import BinaryIO

log = logging.getLogger(__name__)


class RotatingLog:
    """Lines appended to ``path``; before a line would take it past ``max_bytes`` it becomes ``path.1`` (the older
    backups move up one, the oldest beyond ``backups`` is dropped) and a new file starts. With ``backups`` 0 the
    file starts over, empty. A single line longer than ``max_bytes`` is still written whole."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, backups: int):
        if max_bytes <= 0 or backups < 0:
            raise ValueError(f"a log file needs max_bytes > 0 and backups >= 0 (not {max_bytes}, {backups})")
        self.path = os.fspath(path)
        self.max_bytes, self.backups = max_bytes, backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._failing = False  # the latest write failed (and was reported)
        self._lock = threading.Lock()  # a run's output thread and the next run's start may both write

    def write(self, text: str) -> None:
        """Append ``text`` (whole lines), rotating first if need be; errors are logged, never raised."""
        data = text.encode("utf-8", "replace")
        with self._lock:
            try:
                if self._file is None:
                    self._open()
                if self._size > 0 and self._size + len(data) > self.max_bytes:
                    self._rotate()
                assert self._file is not None
                self._file.write(data)
                self._file.flush()
                self._size += len(data)
                self._failing = False
            except OSError as exc:
                self._close()
                if not self._failing:
                    log.warning("cannot write the log file %s (%s); the output is still collected", self.path, exc)
                self._failing = True

    def close(self) -> None:
        """Close the file; the next write opens it again."""
        with self._lock:
            self._close()

    def _open(self) -> None:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed by close()
        self._size = os.fstat(self._file.fileno()).st_size

    def _rotate(self) -> None:
        self._close()
        if self.backups == 0:
            os.remove(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # its buffer could not be flushed: what it held is lost
                log.warning("closing the log file %s failed: %s", self.path, exc)
