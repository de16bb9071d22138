"""Admission: leases within each worker's slots and KV, a bounded priority queue, 503 when it is full."""

import asyncio

import pytest

from fleetserve.errors import NoWorkerError
from fleetserve.gateway.admission import Admission, QueueFullError
from fleetserve.gateway.policies import make_policy
from fleetserve.gateway.policies.base import RouteRequest
from fleetserve.gateway.registry import WorkerRegistry, WorkerState
from fleetserve.protocol import fleet_pb2 as pb


def fleet(*slots, kv_blocks=100):
    reg = WorkerRegistry(connect=lambda address: (None, object()))  # these tests never call a worker
    for i, n in enumerate(slots):
        reg.register(pb.WorkerInfo(name=f"w{i}", address=f"127.0.0.1:{i + 1}", model="m", max_num_seqs=n,
                                   kv_blocks_total=kv_blocks, block_size=16))  # fmt: skip
    policy = make_policy("round-robin")
    return reg, policy


async def settle():
    """Let every ready task run (a placed lease reaches its waiter a few loop turns later)."""
    for _ in range(20):
        await asyncio.sleep(0)


def route(i=0):
    return RouteRequest("m", f"r{i}", [1, 2, 3])


def run(coro):
    return asyncio.run(coro)


def test_leases_fill_slots_then_queue_in_priority_order_then_refuse():
    async def main():
        reg, policy = fleet(1, 1)
        adm = Admission(reg, lambda m: policy, max_queue=2, output_reserve_tokens=16)
        a = await adm.acquire("m", route(0), 19)
        b = await adm.acquire("m", route(1), 19)
        assert {a.worker.name, b.worker.name} == {"w0", "w1"}
        order = []

        async def waiter(i, prio):
            lease = await adm.acquire("m", route(i), 19, priority=prio)
            order.append(i)
            return lease

        low = asyncio.create_task(waiter(2, 5))
        await settle()
        high = asyncio.create_task(waiter(3, 0))
        await settle()
        assert adm.queued("m") == 2
        with pytest.raises(QueueFullError):
            await adm.acquire("m", route(4), 19)
        assert adm.rejected == 1
        # An accepted request (a retry) is never turned away by the bound.
        retry = asyncio.create_task(adm.acquire("m", route(5), 19, accepted=True))
        await settle()
        a.release()
        await settle()
        assert retry.done() and not high.done()  # the retry jumped the queue
        b.release()
        await settle()
        assert order == [3]  # priority 0 before priority 5
        retry.result().release()
        await settle()
        assert order == [3, 2]
        (await high).release()
        (await low).release()
        assert all(w.in_flight == 0 and w.reserved_tokens == 0 for w in reg.workers.values())

    run(main())


def test_kv_reservations_bound_what_a_worker_takes():
    async def main():
        reg, policy = fleet(64, kv_blocks=4)  # 64 tokens of KV
        adm = Admission(reg, lambda m: policy, output_reserve_tokens=8)
        assert adm.tokens_needed(20, 1000) == 28
        first = await adm.acquire("m", route(0), 28)
        second = await adm.acquire("m", route(1), 28)
        third = asyncio.create_task(adm.acquire("m", route(2), 28))
        await settle()
        assert not third.done()  # 84 > 64 tokens
        first.release()
        await settle()
        assert third.done()
        second.release()
        third.result().release()

    run(main())


def test_no_worker_is_503_at_once_and_a_client_leaving_the_queue_frees_its_place():
    async def main():
        reg, policy = fleet(1)
        adm = Admission(reg, lambda m: policy)
        with pytest.raises(NoWorkerError):
            await adm.acquire("other", route(), 10)
        held = await adm.acquire("m", route(), 10)
        waiting = asyncio.create_task(adm.acquire("m", route(1), 10))
        await settle()
        waiting.cancel()
        await settle()
        held.release()
        w = next(iter(reg.workers.values()))
        assert w.in_flight == 0 and adm.queued("m") == 0
        w.state = WorkerState.DRAINING
        with pytest.raises(NoWorkerError):
            await adm.acquire("m", route(), 10)

    run(main())


def test_queue_timeout_answers_instead_of_waiting_forever():
    async def main():
        reg, policy = fleet(1)
        adm = Admission(reg, lambda m: policy, queue_timeout_s=0.05)
        held = await adm.acquire("m", route(), 10)
        with pytest.raises(Exception, match="had room"):
            await adm.acquire("m", route(1), 10)
        assert adm.queued("m") == 0
        held.release()

    run(main())


def test_prompt_blocks_a_worker_holds_are_not_reserved_again():
    async def main():
        reg, policy = fleet(64, kv_blocks=8)  # 128 tokens of KV
        adm = Admission(reg, lambda m: policy)
        w = next(iter(reg.workers.values()))
        prompt = list(range(100))  # 6 full blocks
        route = RouteRequest("m", "r", prompt)
        assert adm.reservation(w, route, 110) == 110
        w.block_hashes = set(route.block_hashes(16)[:4])  # the worker reported the first 4 blocks cached
        assert adm.reservation(w, route, 110) == 110 - 64
        leases = [await adm.acquire("m", RouteRequest("m", f"r{i}", prompt), 110) for i in range(2)]
        assert w.reserved_tokens == 2 * 46  # two fit where, counted in full, only one would
        for lease in leases:
            lease.release()
        assert w.reserved_tokens == 0

    run(main())


def test_a_pool_routes_among_its_role_and_a_preferred_worker_goes_first():
    async def main():
        reg = WorkerRegistry(connect=lambda address: (None, object()))
        for i, role in enumerate(("prefill", "decode", "decode", "replica")):
            reg.register(pb.WorkerInfo(name=f"{role}{i}", address=f"127.0.0.1:{i + 1}", model="m", role=role,
                                       max_num_seqs=4, kv_blocks_total=100, block_size=16))  # fmt: skip
        policy = make_policy("round-robin")
        adm = Admission(reg, lambda m: policy, output_reserve_tokens=16)
        prefill = await adm.acquire("m", RouteRequest("m", "a", [1, 2, 3], pool="prefill"), 19)
        assert prefill.worker.name == "prefill0"
        decodes = [await adm.acquire("m", RouteRequest("m", f"d{i}", [1, 2, 3], pool="decode"), 19) for i in range(2)]
        assert {lease.worker.name for lease in decodes} == {"decode1", "decode2"}  # 60% load + 40% KV: they alternate
        held = reg.workers[decodes[0].worker.worker_id]
        for i in range(3):  # the session's worker is taken while it has room, whatever the policy would say
            lease = await adm.acquire("m", RouteRequest("m", f"s{i}", [1, 2, 3], prefer=held.worker_id), 19)
            assert lease.worker is held
        reg.workers[prefill.worker.worker_id].state = WorkerState.DEAD
        gone = RouteRequest("m", "b", [1, 2, 3], pool="prefill")
        assert (await adm.acquire("m", gone, 19)).worker.info.role != "prefill" and gone.pool is None

    run(main())


def big_fleet(count, policy="prefix-aware"):
    reg = WorkerRegistry(connect=lambda address: (None, object()))
    for i in range(count):
        reg.register(pb.WorkerInfo(name=f"w{i:03}", address=f"127.0.0.1:{i + 1}", model="m", max_num_seqs=4,
                                   kv_blocks_total=100, block_size=16))  # fmt: skip
    return reg, make_policy(policy)


def test_a_large_fleet_routes_over_a_shortlist_that_keeps_the_policys_choice():
    from fleetserve.gateway.admission import SHORTLIST_ABOVE

    async def main():
        reg, policy = big_fleet(SHORTLIST_ABOVE * 3)
        admission = Admission(reg, lambda model: policy)
        workers = list(reg.workers.values())
        # Cold prompts spread over the least loaded, one each, before any worker takes a second.
        leases = [await admission.acquire("m", RouteRequest("m", f"c{i}", list(range(i * 100, i * 100 + 32))), 40)
                  for i in range(len(workers))]  # fmt: skip
        assert sorted(lease.worker.worker_id for lease in leases) == sorted(w.worker_id for w in workers)
        for lease in leases:
            lease.release()
        # A prompt whose first block a worker's heartbeat lists goes there, among a hundred idle workers.
        prompt = list(range(5000, 5048))
        holder = workers[77]
        hashes = RouteRequest("m", "", prompt).block_hashes(16)
        reg.heartbeat(
            pb.HeartbeatReport(worker_id=holder.worker_id, block_hashes=pb.BlockHashDelta(reset=True, added=hashes))
        )
        full_scans = []
        scan = reg.routable
        reg.routable = lambda *a: full_scans.append(a) or scan(*a)
        lease = await admission.acquire("m", RouteRequest("m", "p", prompt), 60)
        assert lease.worker is holder and full_scans == []  # found without looking at every worker
        lease.release()
        # The policy's own routing history counts too: a new prefix sent once is sent to the same worker again.
        fresh = list(range(9000, 9040))
        first = await admission.acquire("m", RouteRequest("m", "f1", fresh), 50)
        again = await admission.acquire("m", RouteRequest("m", "f2", fresh + [1]), 50)
        assert again.worker is first.worker
        # A session's worker is taken when it has room, wherever it sits in the load order.
        first.worker.in_flight += 2  # busier than the rest (the buckets are rebuilt on the next membership change)
        preferred = next(w for w in workers[5:] if w is not first.worker)  # ids are random: not the full one
        held = await admission.acquire("m", RouteRequest("m", "s", [1, 2, 3], prefer=preferred.worker_id), 10)
        assert held.worker is preferred
        # A full shortlist falls back to every worker: only one worker has room left.
        for w in workers:
            w.in_flight = 4 if w is not workers[90] else 0
        reg.generation += 1
        last = await admission.acquire("m", RouteRequest("m", "l", [7, 8, 9]), 10)
        assert last.worker is workers[90]

    run(main())


def test_decisions_are_timed():
    async def main():
        reg, policy = fleet(2, 2)
        admission = Admission(reg, lambda model: policy)
        await admission.acquire("m", route(1), 10)
        summary = admission.decision_times.summary()
        assert summary["count"] == 1 and 0 < summary["p50_us"] <= summary["max_us"]

    run(main())
