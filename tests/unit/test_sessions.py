"""The gateway's session table: who holds a session, what a move returns, ids checked, the listing."""

import pytest

from fleetserve.errors import InvalidRequestError
from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.gateway.sessions import SessionTable, check_session_id
from fleetserve.protocol import fleet_pb2 as pb


def registry(*names):
    reg = WorkerRegistry(connect=lambda address: (None, object()))
    for i, name in enumerate(names):
        reg.register(pb.WorkerInfo(name=name, address=f"127.0.0.1:{i + 1}", model="m", kv_blocks_total=10))
    return reg, {w.name: w for w in reg.workers.values()}


def test_a_session_is_held_where_its_last_turn_finished_and_moves_when_that_worker_goes():
    reg, w = registry("a", "b")
    table = SessionTable(reg)
    assert table.holder("k:s", "m") is None and "k:s" not in table
    assert table.record("k:s", "m", w["a"]) is None
    assert table.holder("k:s", "m") is w["a"] and table.holder("k:s", "other-model") is None
    w["a"].state = WorkerState.DRAINING  # not routable: the next turn goes elsewhere
    assert table.holder("k:s", "m") is None
    assert table.record("k:s", "m", w["b"]) is w["a"]  # the old holder, still registered, should let go
    assert table.moved == 1 and table.holder("k:s", "m") is w["b"]
    w["b"].sessions = {"k:s": pb.PinnedSession(session_id="k:s", tokens=120, blocks=8, idle_s=1.5, ttl_left_s=30)}
    (listed,) = table.to_json()
    assert (listed["id"], listed["worker"], listed["turns"], listed["held"], listed["tokens"]) == (
        "s",
        "b",
        2,
        True,
        120,
    )
    assert table.holders("k:s") == [w["b"]]
    assert table.forget("k:s") is not None and len(table) == 0


def test_a_session_this_gateway_never_saw_goes_to_the_worker_whose_heartbeat_lists_it():
    reg, w = registry("a", "b", "c")
    table = SessionTable(reg)  # another gateway served the turns; this one knows only the heartbeats
    pinned = {"a": 9.0, "b": 0.5}
    for name, idle in pinned.items():
        w[name].sessions = {"k:s": pb.PinnedSession(session_id="k:s", tokens=64, blocks=4, idle_s=idle)}
    assert table.holder("k:s", "m") is w["b"]  # the most recently used copy
    assert table.holder("k:s", "other-model") is None and table.holder("k:other", "m") is None
    w["b"].state = WorkerState.DRAINING
    assert table.holder("k:s", "m") is w["a"]
    table.record("k:s", "m", w["c"])  # a turn here moves it; the table's own entry comes first from now on
    assert table.holder("k:s", "m") is w["c"]
    w["c"].state = WorkerState.DEAD  # its worker gone: back to what the heartbeats say
    assert table.holder("k:s", "m") is w["a"]


def test_the_table_is_bounded_and_ids_are_checked():
    reg, w = registry("a")
    table = SessionTable(reg, max_sessions=2)
    for i in range(3):
        table.record(f"k:{i}", "m", w["a"])
    assert "k:0" not in table and len(table) == 2  # the least recently used went first
    assert check_session_id("conv-1.2:x") == "conv-1.2:x"
    for bad in ("", "has space", "x" * 129, 7, "tab\there"):
        with pytest.raises(InvalidRequestError, match="session_id"):
            check_session_id(bad)
