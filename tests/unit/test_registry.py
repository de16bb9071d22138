"""The worker registry's health state machine, with an injected clock and no network."""

from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.gateway.registry_store import RegistryStore
from fleetserve.protocol import fleet_pb2 as pb


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def info(name="a", address="127.0.0.1:1", model="m"):
    return pb.WorkerInfo(name=name, address=address, model=model, kv_blocks_total=10, block_size=16)


def make(clock, **kw):
    kw.setdefault("failure_threshold", 2)
    return WorkerRegistry(heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0, clock=clock, connect=no_network, **kw)


def no_network(address):
    """A stand-in for the gRPC channel: these tests never call a worker."""
    return None, object()


def beat(reg, record, **kw):
    return reg.heartbeat(pb.HeartbeatReport(worker_id=record.worker_id, **kw))


def test_late_heartbeat_makes_suspect_and_a_heartbeat_clears_it():
    clock = Clock()
    reg = make(clock)
    w = reg.register(info())
    assert w.routable and reg.routable("m") == [w]
    clock.now += 2.5
    reg.sweep()
    assert w.state == WorkerState.SUSPECT and w.suspect_reason == "heartbeat" and not w.routable
    beat(reg, w)
    assert w.state == WorkerState.HEALTHY


def test_silence_past_the_timeout_makes_dead_and_listeners_hear_it():
    clock = Clock()
    reg = make(clock)
    gone = []
    reg.on_dead.append(lambda r: gone.append(r.worker_id))
    w = reg.register(info())
    clock.now += 5.5
    assert reg.sweep() == [w]
    assert w.state == WorkerState.DEAD and gone == [w.worker_id]
    assert beat(reg, w) is None  # a dead worker must register again
    assert reg.workers[w.worker_id] is w  # still listed, as dead


def test_request_failures_make_suspect_until_a_probe_passes():
    clock = Clock()
    reg = make(clock)
    w = reg.register(info())
    reg.record_failure(w)
    assert w.state == WorkerState.HEALTHY
    reg.record_success(w)
    reg.record_failure(w)
    assert w.state == WorkerState.HEALTHY  # a success in between resets the count
    reg.record_failure(w)
    assert w.state == WorkerState.SUSPECT and w.suspect_reason == "failures"
    beat(reg, w)
    assert w.state == WorkerState.SUSPECT  # heartbeats alone do not clear failures
    assert reg.suspects() == [w]
    reg.probe_result(w, True)
    assert w.state == WorkerState.HEALTHY and w.consecutive_failures == 0


def test_failed_probes_make_dead():
    clock = Clock()
    reg = make(clock)
    w = reg.register(info())
    reg.record_failure(w)
    reg.record_failure(w)
    reg.probe_result(w, False, "timeout")
    assert w.state == WorkerState.SUSPECT
    reg.probe_result(w, False, "timeout")
    assert w.state == WorkerState.DEAD


def test_draining_is_not_routable_and_block_hash_deltas_apply():
    clock = Clock()
    reg = make(clock)
    w = reg.register(info())
    beat(reg, w, block_hashes=pb.BlockHashDelta(reset=True, added=[1, 2, 3]))
    assert w.block_hashes == {1, 2, 3}
    beat(reg, w, block_hashes=pb.BlockHashDelta(added=[4], removed=[1]))
    assert w.block_hashes == {2, 3, 4}
    beat(reg, w, draining=True)
    assert w.state == WorkerState.DRAINING and not w.routable


def test_reregistering_keeps_the_id_and_dead_workers_are_forgotten_after_retention():
    clock = Clock()
    reg = make(clock, dead_retention_s=60)
    w = reg.register(info())
    clock.now += 6
    reg.sweep()
    again = reg.register(info())
    assert again.worker_id == w.worker_id and again.routable
    other = reg.register(info("b", "127.0.0.1:2"))
    assert other.worker_id != w.worker_id
    clock.now += 6
    reg.sweep()
    clock.now += 61
    reg.sweep()
    assert reg.workers == {}


def test_the_store_brings_known_workers_back_as_dead_with_their_ids(tmp_path):
    clock = Clock()
    store = RegistryStore(tmp_path / "r.sqlite")
    reg = make(clock, store=store)
    a = reg.register(info("a", "127.0.0.1:1"))
    b = reg.register(info("b", "127.0.0.1:2"))
    reg.remove(b.worker_id)  # deregistered workers are not kept
    store.close()
    store = RegistryStore(tmp_path / "r.sqlite")
    restored = make(clock, store=store)
    assert list(restored.workers) == [a.worker_id]
    assert restored.workers[a.worker_id].state == WorkerState.DEAD
    assert restored.register(info("a", "127.0.0.1:1")).worker_id == a.worker_id
    fresh = restored.register(info("c", "127.0.0.1:3"))
    assert fresh.worker_id != a.worker_id
    store.close()


def test_a_fresh_assignment_clears_failures_of_the_old_role():
    from fleetserve.gateway.registry import WorkerRegistry, WorkerState
    from fleetserve.protocol import fleet_pb2 as pb

    registry = WorkerRegistry(failure_threshold=2, connect=lambda address: (None, None))
    record = registry.register(pb.WorkerInfo(name="s", address="127.0.0.1:1", model="m"))
    registry.record_failure(record, "engine stopped")
    registry.record_failure(record, "engine stopped")
    assert record.state == WorkerState.SUSPECT
    registry.fresh_start(record)
    assert record.state == WorkerState.HEALTHY and record.consecutive_failures == 0


def test_block_holders_follow_every_report_and_leave_with_the_worker():
    clock = Clock()
    reg = make(clock)
    a, b = reg.register(info("a", "127.0.0.1:1")), reg.register(info("b", "127.0.0.1:2"))
    beat(reg, a, block_hashes=pb.BlockHashDelta(reset=True, added=[1, 2, 3]))
    beat(reg, b, block_hashes=pb.BlockHashDelta(reset=True, added=[3, 4]))
    assert reg.holders_of(1) == (a.worker_id,) and sorted(reg.holders_of(3)) == sorted([a.worker_id, b.worker_id])
    beat(reg, a, block_hashes=pb.BlockHashDelta(added=[5, 2], removed=[2, 3]))  # 2 both removed and added: kept
    assert a.block_hashes == {1, 2, 5} and reg.holders_of(3) == (b.worker_id,) and reg.holders_of(2) == (a.worker_id,)
    beat(reg, a, block_hashes=pb.BlockHashDelta(added=list(range(100, 110))))  # past its 10 KV blocks: ignored
    assert a.block_hashes == {1, 2, 5} and reg.holders_of(100) == ()
    beat(reg, b, block_hashes=pb.BlockHashDelta(reset=True, added=[1]))
    assert sorted(reg.holders_of(1)) == sorted([a.worker_id, b.worker_id]) and reg.holders_of(4) == ()
    reg.mark_dead(a, "test")
    assert reg.holders_of(1) == (b.worker_id,) and reg.holders_of(5) == ()
    generation = reg.generation
    reg.remove(b.worker_id)
    assert reg.holders_of(1) == () and reg.generation > generation
