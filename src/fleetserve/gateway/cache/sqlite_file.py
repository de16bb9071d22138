"""The SQLite file a persisted ``MemoryCache`` writes through to, so its entries survive a gateway restart.

Every ``set``/``delete`` (and its evictions) is written at once; the unexpired rows are read back, in LRU order,
when the cache is opened again. Deadlines are kept on disk as wall-clock (``time.time()``) epoch seconds, for the
cache to convert to its own clock on load. Refreshes of the LRU order by ``get`` are written in batches (and on
``close``), so a crash may lose the most recent reordering but never an entry.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Iterator

from fleetserve.private_files import make_private

TABLE = "response_cache"
_SCHEMA = f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        key        TEXT PRIMARY KEY,
        value      BLOB NOT NULL,
        expires_at REAL,
        last_used  REAL NOT NULL
    )
"""
_COLUMNS = {"key", "value", "expires_at", "last_used"}


class CacheFile:
    """One response cache database: write-through upserts and deletes, batched LRU refreshes, and the reload.

    Not thread-safe on its own: the owning ``MemoryCache`` calls it with its lock held.
    """

    TOUCH_BATCH = 256
    """Pending LRU refreshes are written to disk once this many have piled up (or with the next write)."""

    def __init__(self, path: str):
        self.path = path
        try:
            if path != ":memory:":
                make_private(path)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open response cache database {path}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot create response cache database {path}: {exc.strerror}") from None
        self._pending_touch: dict[str, float] = {}
        self._pending_delete: set[str] = set()
        self._stamp = 0.0
        """The last ``last_used`` stamp handed out."""
        with self.opening():
            self._prepare()

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """While the file is being opened and loaded: on failure, close it and raise ``ValueError``."""
        try:
            yield
        except ValueError:
            self._conn.close()
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise ValueError(f"{self.path} is not a usable response cache database: {exc}") from None

    def _prepare(self) -> None:
        conn = self._conn
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and TABLE not in tables:
            raise ValueError(
                f"{self.path} is a SQLite database of another program (tables: {', '.join(sorted(tables))}), "
                "not a fleetserve response cache"
            )
        if TABLE in tables:
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
            if not columns.issuperset(_COLUMNS):
                raise ValueError(
                    f"{self.path} has a {TABLE} table without column(s) {', '.join(sorted(_COLUMNS - columns))}"
                )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(_SCHEMA)

    def load(self, wall_now: float) -> list[tuple[str, bytes, float | None]]:
        """The rows unexpired at ``wall_now`` as (key, value, wall-clock deadline), least recently used first; the
        expired rows are deleted from the file."""
        with self._transaction() as conn:
            conn.execute(f"DELETE FROM {TABLE} WHERE expires_at IS NOT NULL AND expires_at <= ?", (wall_now,))
        rows = self._conn.execute(
            f"SELECT key, value, expires_at, last_used FROM {TABLE} ORDER BY last_used, key"
        ).fetchall()
        loaded = []
        for key, value, wall_expires_at, last_used in rows:
            loaded.append((key, bytes(value), wall_expires_at))
            self._stamp = max(self._stamp, float(last_used))
        return loaded

    def touch(self, key: str) -> None:
        """``key`` was just used: refresh its LRU stamp with the next batch."""
        self._pending_touch[key] = self._next_stamp()
        if len(self._pending_touch) >= self.TOUCH_BATCH:
            self.write([], [])

    def drop_later(self, key: str) -> None:
        """``key`` expired: delete its row with the next write (expired rows are skipped on load anyway)."""
        self._pending_touch.pop(key, None)
        self._pending_delete.add(key)

    def write(self, upserts: list[tuple[str, bytes, float | None]], deletes: list[str]) -> None:
        """Store (key, value, wall-clock deadline) rows as the most recently used and delete ``deletes``, with the
        pending refreshes and deletions, in one transaction."""
        stamped = [(key, value, wall_expires_at, self._next_stamp()) for key, value, wall_expires_at in upserts]
        written = {row[0] for row in upserts} | set(deletes)
        touches = [(stamp, key) for key, stamp in self._pending_touch.items() if key not in written]
        dropped = [(key,) for key in self._pending_delete if key not in written]
        with self._transaction() as conn:
            if touches:
                conn.executemany(f"UPDATE {TABLE} SET last_used = ? WHERE key = ?", touches)
            if dropped or deletes:
                conn.executemany(f"DELETE FROM {TABLE} WHERE key = ?", dropped + [(k,) for k in deletes])
            if stamped:
                conn.executemany(
                    f"""
                    INSERT INTO {TABLE} (key, value, expires_at, last_used) VALUES (?, ?, ?, ?)
                    ON CONFLICT (key) DO UPDATE SET
                        value = excluded.value, expires_at = excluded.expires_at, last_used = excluded.last_used
                    """,
                    stamped,
                )
        self._pending_touch.clear()
        self._pending_delete.clear()

    def clear(self) -> None:
        """Delete every row."""
        with self._transaction() as conn:
            conn.execute(f"DELETE FROM {TABLE}")
        self._pending_touch.clear()
        self._pending_delete.clear()

    def close(self) -> None:
        """Write what is pending and close the file."""
        try:
            if self._pending_touch or self._pending_delete:
                self.write([], [])
        finally:
            self._conn.close()

    def _next_stamp(self) -> float:
        """A strictly increasing wall-clock stamp for the ``last_used`` column (equal readings are bumped)."""
        now = time.time()
        self._stamp = now if now > self._stamp else math.nextafter(self._stamp, math.inf)
        return self._stamp

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on an autocommit connection, rolled back when the body raises."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
