"""The registry's SQLite store: round trips across reopening, upserts, concurrent use and refused files."""

import sqlite3
import threading

import pytest

from fleetserve.gateway.models import ModelSpec
from fleetserve.gateway.registry_store import SCHEMA_VERSION, RegistryStore, StoredWorker
from fleetserve.protocol import fleet_pb2 as pb


def info(name="a", model="m", **kw):
    return pb.WorkerInfo(
        name=name,
        address=kw.pop("address", f"127.0.0.1:{len(name)}"),
        model=model,
        role="replica",
        kv_blocks_total=100,
        block_size=16,
        max_model_len=2048,
        tokenizer_fingerprint="f" * 64,
        model_version="v1",
        num_layers=30,
        dtype="bfloat16",
        **kw,
    )


def test_workers_round_trip_across_close_and_reopen(tmp_path):
    path = tmp_path / "state" / "registry.sqlite"  # missing folders are created
    store = RegistryStore(path)
    store.save_worker("w1-a", info("a", memory_cap_bytes=2**40), "healthy", 1000.5, 1001.25)
    store.save_worker("w2-b", info("b"), "suspect", 1002.0, 1003.0)
    store.close()
    store.close()  # twice is fine

    with RegistryStore(str(path)) as store:
        workers = store.load_workers()
    assert [w.worker_id for w in workers] == ["w1-a", "w2-b"]
    first = workers[0]
    assert first == StoredWorker("w1-a", info("a", memory_cap_bytes=2**40), "healthy", 1000.5, 1001.25)
    assert first.info.memory_cap_bytes == 2**40 and first.info.num_layers == 30
    assert workers[1].state == "suspect"


def test_save_worker_upserts_and_state_updates_and_deletes(tmp_path):
    store = RegistryStore(tmp_path / "r.sqlite")
    store.save_worker("w1-a", info("a"), "healthy", 1.0, 1.0)
    store.save_worker("w1-a", info("a", address="10.0.0.1:9"), "draining", 5.0, 6.0)
    [w] = store.load_workers()
    assert w.info.address == "10.0.0.1:9" and w.state == "draining" and w.registered_at == 5.0

    assert store.update_state("w1-a", "dead", 9.0)
    [w] = store.load_workers()
    assert (w.state, w.last_seen, w.registered_at) == ("dead", 9.0, 5.0)
    assert not store.update_state("nobody", "dead", 9.0)

    assert store.delete_worker("w1-a")
    assert not store.delete_worker("w1-a")
    assert store.load_workers() == []
    store.close()


def test_models_round_trip_and_upsert(tmp_path):
    path = tmp_path / "r.sqlite"
    store = RegistryStore(path)
    store.save_model(ModelSpec("b", version="1", policy_options={"k": 2}).to_json())
    store.save_model(ModelSpec("a", configured=False).to_json())
    store.save_model(ModelSpec("b", version="2", temperature=0.5).to_json())
    with pytest.raises(ValueError, match="name"):
        store.save_model({"version": "1"})
    store.close()

    store = RegistryStore(path)
    models = store.load_models()
    assert [m["name"] for m in models] == ["a", "b"]
    assert ModelSpec.from_json(models[1]) == ModelSpec("b", version="2", temperature=0.5)
    assert models[0]["configured"] is False
    assert store.delete_model("a") and [m["name"] for m in store.load_models()] == ["b"]
    store.close()


def test_schema_version_and_wal_mode(tmp_path):
    path = tmp_path / "r.sqlite"
    RegistryStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"workers", "models"} <= tables
    finally:
        conn.close()


def test_a_failed_write_rolls_back(tmp_path):
    store = RegistryStore(tmp_path / "r.sqlite")
    store.save_worker("w1-a", info("a"), "healthy", 1.0, 1.0)
    with pytest.raises(sqlite3.IntegrityError):
        store.save_worker("w2-b", info("b"), None, 1.0, 1.0)
    assert [w.worker_id for w in store.load_workers()] == ["w1-a"]
    store.save_worker("w3-c", info("c"), "healthy", 2.0, 2.0)  # the store is still usable
    assert len(store.load_workers()) == 2
    store.close()


def test_two_threads_write_and_read_at_once(tmp_path):
    store = RegistryStore(tmp_path / "r.sqlite")
    errors = []
    start = threading.Barrier(2)

    def work(prefix):
        try:
            start.wait()
            for i in range(100):
                wid = f"{prefix}{i}"
                store.save_worker(wid, info(wid), "healthy", float(i), float(i))
                store.update_state(wid, "suspect", float(i) + 0.5)
                store.save_model({"name": f"{prefix}-model-{i % 5}", "version": str(i)})
                store.load_workers()
                if i % 2:
                    store.delete_worker(wid)
        except Exception as exc:  # collected and failed on below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    workers = store.load_workers()
    assert len(workers) == 100 and all(w.state == "suspect" for w in workers)
    assert len(store.load_models()) == 10
    store.close()


def test_a_corrupt_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(ValueError, match="garbage.sqlite"):
        RegistryStore(path)


def test_a_damaged_database_is_refused(tmp_path):
    path = tmp_path / "damaged.sqlite"
    store = RegistryStore(path)
    for i in range(200):
        store.save_worker(f"w{i}", info(f"worker-{i}"), "healthy", 1.0, 1.0)
    store.close()
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # keep the header, wreck every page
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.sqlite"):
        RegistryStore(path)


def test_another_programs_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=r"other\.db.*another program"):
        RegistryStore(path)


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    RegistryStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match="newer"):
        RegistryStore(path)


def test_an_unreadable_worker_row_is_reported(tmp_path):
    path = tmp_path / "r.sqlite"
    store = RegistryStore(path)
    store.save_worker("w1-a", info("a"), "healthy", 1.0, 1.0)
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE workers SET info = ?", (b"\xff\xff\xff",))
    conn.commit()
    conn.close()
    store = RegistryStore(path)
    with pytest.raises(ValueError, match="w1-a"):
        store.load_workers()
    store.close()


def test_a_closed_store_says_so(tmp_path):
    store = RegistryStore(tmp_path / "r.sqlite")
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.load_workers()


def test_state_file_is_private(tmp_path):
    import stat

    path = tmp_path / "state" / "registry.sqlite"
    store = RegistryStore(path)
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
