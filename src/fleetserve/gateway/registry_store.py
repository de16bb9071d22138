"""The worker registry's durable part: known workers and models in one SQLite file.

Tables:

* ``workers``: one row per worker id with its state, registration time and last sighting (wall-clock
  ``time.time()`` seconds) and its ``WorkerInfo``. The info is kept as the message's binary protobuf encoding
  (``SerializeToString`` / ``ParseFromString``): it round-trips exactly, needs no field-by-field mapping, and
  stays readable across versions (fields added later are skipped by an older gateway and read as defaults by a
  newer one). Name, address and model are also copied into plain columns so the file can be inspected with the
  ``sqlite3`` shell.
* ``models``: one row per model name with its spec as JSON (``ModelSpec.to_json()``).

The schema version lives in ``PRAGMA user_version``. A file that is not SQLite, is damaged, or holds another
program's tables is refused on open with a ``ValueError`` naming it. The database runs in WAL mode; every write
is one transaction. One connection is shared by all threads (``check_same_thread=False``) behind a lock, so the
store may be used from the event loop and from helper threads alike.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from fleetserve.private_files import make_private
from fleetserve.protocol import fleet_pb2 as pb

SCHEMA_VERSION = 1

_SCHEMA = (
    """
    CREATE TABLE workers (
        worker_id     TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        address       TEXT NOT NULL,
        model         TEXT NOT NULL,
        info          BLOB NOT NULL,
        state         TEXT NOT NULL,
        registered_at REAL NOT NULL,
        last_seen     REAL NOT NULL
    )
    """,
    """
    CREATE TABLE models (
        name       TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
)
_TABLES = {"workers", "models"}


@dataclass
class StoredWorker:
    """One worker as the store remembers it."""

    worker_id: str
    info: pb.WorkerInfo
    state: str
    registered_at: float
    last_seen: float


class RegistryStore:
    """Known workers and models, kept in a SQLite file across gateway restarts."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                make_private(self.path)  # worker addresses and ids: this user's alone
            # Autocommit mode: transactions are opened and closed explicitly by _write().
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open registry database {self.path}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot create registry database {self.path}: {exc.strerror}") from None
        try:
            self._open()
        except ValueError:
            self._conn.close()
            self._conn = None
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            self._conn = None
            raise ValueError(f"{self.path} is not a usable fleetserve registry database: {exc}") from None

    def _open(self) -> None:
        conn = self._conn
        assert conn is not None
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise ValueError(f"registry database {self.path} is damaged: {check}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            conn.execute("PRAGMA journal_mode = WAL")
            with self._write():
                if not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:  # no other process won
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version == 0:
            raise ValueError(
                f"{self.path} is a SQLite database of another program (tables: {', '.join(sorted(tables))}), "
                "not a fleetserve registry"
            )
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"registry database {self.path} has schema version {version}, newer than this fleetserve "
                f"understands ({SCHEMA_VERSION})"
            )
        if not tables.issuperset(_TABLES):
            raise ValueError(
                f"registry database {self.path} lacks table(s) {', '.join(sorted(_TABLES - tables))}; "
                "it is not a fleetserve registry"
            )
        conn.execute("PRAGMA journal_mode = WAL")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction (committed on success, rolled back on error)."""
        conn = self._connection()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"registry database {self.path} is closed")
        return self._conn

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self._connection()
        with self._lock:
            return conn.execute(sql, params).fetchall()

    # -- workers -----------------------------------------------------------------------------------------

    def save_worker(
        self, worker_id: str, info: pb.WorkerInfo, state: str, registered_at: float, last_seen: float
    ) -> None:
        """Insert the worker, or replace everything stored under its id."""
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO workers (worker_id, name, address, model, info, state, registered_at, last_seen)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (worker_id) DO UPDATE SET
                    name = excluded.name, address = excluded.address, model = excluded.model,
                    info = excluded.info, state = excluded.state,
                    registered_at = excluded.registered_at, last_seen = excluded.last_seen
                """,
                (
                    worker_id,
                    info.name,
                    info.address,
                    info.model,
                    info.SerializeToString(),
                    state,
                    float(registered_at),
                    float(last_seen),
                ),
            )

    def update_state(self, worker_id: str, state: str, last_seen: float) -> bool:
        """Record a state change; False when no worker has that id."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE workers SET state = ?, last_seen = ? WHERE worker_id = ?", (state, float(last_seen), worker_id)
            )
            return cursor.rowcount > 0

    def delete_worker(self, worker_id: str) -> bool:
        """Forget a worker; False when no worker has that id."""
        with self._write() as conn:
            return conn.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,)).rowcount > 0

    def load_workers(self) -> list[StoredWorker]:
        """Every stored worker, oldest registration first."""
        rows = self._read(
            "SELECT worker_id, info, state, registered_at, last_seen FROM workers ORDER BY registered_at, worker_id"
        )
        workers = []
        for worker_id, blob, state, registered_at, last_seen in rows:
            info = pb.WorkerInfo()
            try:
                info.ParseFromString(bytes(blob))
            except (DecodeError, TypeError) as exc:
                raise ValueError(
                    f"registry database {self.path}: worker {worker_id!r} has unreadable info: {exc}"
                ) from None
            workers.append(StoredWorker(worker_id, info, state, registered_at, last_seen))
        return workers

    # -- models ------------------------------------------------------------------------------------------

    def save_model(self, spec_json: dict[str, Any]) -> None:
        """Insert or replace a model spec (a ``ModelSpec.to_json()`` dict), keyed by its name."""
        name = spec_json.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a stored model needs a non-empty 'name', got {name!r}")
        text = json.dumps(spec_json, sort_keys=True)
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO models (name, spec, updated_at) VALUES (?, ?, ?)
                ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at
                """,
                (name, text, time.time()),
            )

    def delete_model(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount > 0

    def load_models(self) -> list[dict[str, Any]]:
        """Every stored model spec, by name."""
        models = []
        for name, text in self._read("SELECT name, spec FROM models ORDER BY name"):
            try:
                spec = json.loads(text)
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(
                    f"registry database {self.path}: model {name!r} has an unreadable spec: {exc}"
                ) from None
            if not isinstance(spec, dict):
                raise ValueError(f"registry database {self.path}: model {name!r} has a spec that is not a mapping")
            spec["name"] = name
            models.append(spec)
        return models

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (again is a no-op)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
