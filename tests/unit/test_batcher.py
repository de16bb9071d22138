"""The dynamic batcher: BatchQueue's decisions with plain-float times, DynamicBatcher with a pure-python ``run``."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fleetserve.engine.batcher import (
    Batch,
    BatcherClosedError,
    BatchPolicy,
    BatchQueue,
    DynamicBatcher,
)
from fleetserve.errors import InvalidRequestError

BAD = -1  # an input holding this id makes the fake model raise


def lengths(batch: Batch) -> list[int]:
    return [len(ids) for ids in batch.inputs]


def drain(q: BatchQueue, now: float) -> list[Batch]:
    batches = []
    while (batch := q.take(now)) is not None:
        batches.append(batch)
    return batches


# -- BatchQueue -----------------------------------------------------------------------------------------------


def test_a_full_batch_is_due_at_once():
    q = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_delay_s=1.0))
    q.add("m", [[1], [2], [3]], now=0.0)
    assert q.take(0.0) is None
    q.add("m", [[4], [5]], now=0.1)
    batch = q.take(0.1)
    assert batch.inputs == [[1], [2], [3], [4]] and batch.key == "m"
    assert batch.waited_s == pytest.approx([0.1, 0.1, 0.1, 0.0])
    assert len(q) == 1 and q.take(0.1) is None


def test_a_partial_batch_waits_for_the_delay():
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01))
    assert q.next_due() is None and q.take(5.0) is None
    q.add("m", [[1, 2], [3]], now=2.0)
    q.add("m", [[4]], now=2.005)
    assert q.next_due() == pytest.approx(2.01)
    assert q.take(2.009) is None
    batch = q.take(q.next_due())
    assert batch.inputs == [[1, 2], [3], [4]]
    assert batch.waited_s == pytest.approx([0.01, 0.01, 0.005])
    assert (batch.tokens, batch.padded_tokens) == (4, 6)
    assert len(q) == 0 and q.next_due() is None


def test_an_adaptive_delay_waits_only_while_requests_come_closer_together_than_it():
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01, adaptive_delay=True))
    q.add("m", [[1]], now=0.0)
    assert q.take(0.0) is None  # nothing known of the gaps yet: the delay applies
    assert q.take(0.01).inputs == [[1]]
    for t in (0.5, 1.0):  # requests half a second apart: waiting would only add latency
        q.add("m", [[2]], now=t)
        assert q.take(t).inputs == [[2]] and q.next_due() is None
    for i in range(7):  # a burst, 2 ms apart: the average gap falls under the delay, and it applies again
        q.add("m", [[3]], now=1.5 + 0.002 * i)
    assert q.take(1.509) is None and q.next_due() == pytest.approx(1.5 + 0.01)
    plain = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01))
    for t in (0.0, 0.5, 1.0):
        plain.add("m", [[1]], now=t)
        assert plain.take(t) is None  # without it, every lone input waits the delay
        plain.take(t + 0.01)


def test_preferred_sizes_run_without_waiting():
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=1.0, preferred_batch_sizes=(2, 4)))
    q.add("m", [[1]], now=0.0)
    assert q.take(0.0) is None
    q.add("m", [[2]], now=0.0)
    assert len(q.take(0.0).inputs) == 2
    q.add("m", [[i] for i in range(3)], now=0.0)
    assert len(q.take(0.0).inputs) == 2  # the largest preferred size that 3 can fill
    assert q.take(0.0) is None  # 1 left: waits
    q.add("m", [[i] for i in range(5)], now=0.5)
    assert [len(b.inputs) for b in drain(q, 0.5)] == [4, 2]
    assert [len(b.inputs) for b in drain(q, 1.5)] == []


def test_keys_never_mix_and_the_oldest_due_goes_first():
    q = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_delay_s=0.01))
    q.add("a", [[1]], now=0.0)
    q.add("b", [[2], [3]], now=0.001)
    assert q.take(0.0105).key == "a"
    assert q.take(0.0105) is None
    assert q.take(0.011).key == "b"
    # b is full, but a's oldest input is due and older
    q.add("a", [[1]], now=1.0)
    q.add("b", [[2], [3], [4], [5]], now=1.005)
    assert [(b.key, len(b.inputs)) for b in drain(q, 1.01)] == [("a", 1), ("b", 4)]
    # before a is due, the full b runs alone
    q.add("a", [[1]], now=2.0)
    q.add("b", [[2], [3], [4], [5]], now=2.005)
    assert [b.key for b in drain(q, 2.006)] == ["b"]


def test_inputs_of_similar_length_share_a_batch():
    q = BatchQueue(BatchPolicy(max_batch_size=2, max_queue_delay_s=0.0))
    q.add("m", [[0] * 10, [0] * 50, [0] * 12, [0] * 48], now=0.0)
    assert [lengths(b) for b in drain(q, 0.0)] == [[10, 12], [50, 48]]


def test_a_long_input_pads_short_ones_only_once_it_is_the_oldest():
    # The rule: the oldest input seeds the batch (nothing starves), the inputs closest in length fill it, equally
    # close ones oldest first. So a long input in the middle of 31 short ones waits while the short ones ahead of
    # it batch together, then seeds a batch of its own with the 7 oldest short ones left.
    short, long = [1] * 4, [2] * 100
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.0))
    inputs = [list(short) for _ in range(31)]
    inputs.insert(10, long)
    q.add("m", inputs, now=0.0)
    batches = drain(q, 0.0)
    ids = {id(x): i for i, x in enumerate(inputs)}
    assert [[ids[id(x)] for x in b.inputs] for b in batches] == [
        list(range(0, 8)),
        [8, 9, *range(11, 17)],
        [10, *range(17, 24)],
        list(range(24, 32)),
    ]
    assert [b.padded_tokens for b in batches] == [32, 32, 800, 32]
    # first in line, the long input seeds the first batch
    q.add("m", [long] + [list(short) for _ in range(31)], now=0.0)
    assert [b.padded_tokens for b in drain(q, 0.0)] == [800, 32, 32, 32]


def test_max_batch_tokens_caps_the_padded_batch():
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=1.0, max_batch_tokens=64))
    q.add("m", [[0] * 8 for _ in range(10)], now=0.0)
    batch = q.take(0.0)  # 8 x 8 fills the cap and the size
    assert len(batch.inputs) == 8 and batch.padded_tokens == 64
    assert q.take(0.0) is None
    assert len(q.take(1.0).inputs) == 2
    # 3 x 30 > 64: two of these fill a batch, so it runs at once
    q.add("m", [[0] * 30 for _ in range(3)], now=2.0)
    assert lengths(q.take(2.0)) == [30, 30] and q.take(2.0) is None
    q.take(3.0)
    # the closest in length (40) would pass the cap; a farther, shorter one (8) still fits
    q.add("m", [[0] * 20, [0] * 40, [0] * 8], now=4.0)
    assert lengths(q.take(5.0)) == [20, 8]
    q.take(5.0)
    # an input longer than the cap runs alone, at once: nothing could join it
    q.add("m", [[0] * 100, [0] * 2], now=6.0)
    assert lengths(q.take(6.0)) == [100] and q.take(6.0) is None


def test_leftovers_keep_their_arrival_times():
    q = BatchQueue(BatchPolicy(max_batch_size=2, max_queue_delay_s=0.01))
    q.add("m", [[1], [2], [3]], now=0.0)
    assert q.take(0.004).inputs == [[1], [2]]
    assert q.next_due() == pytest.approx(0.01)
    assert q.take(0.009) is None
    batch = q.take(0.01)
    assert batch.inputs == [[3]] and batch.waited_s == pytest.approx([0.01])


def test_discard_and_clear():
    q = BatchQueue(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01))
    first = q.add("m", [[1], [2]], now=0.0)
    second = q.add("m", [[3]], now=0.001)
    other = q.add("x", [[4]], now=0.002)
    assert q.discard(first) == 2 and len(q) == 2 and q.discard(first) == 0
    assert q.next_due() == pytest.approx(0.011)
    assert q.clear() == [second, other] and len(q) == 0 and q.take(1.0) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_queue_delay_s": -0.1}, "max_queue_delay_s must be >= 0"),
        ({"max_queue_delay_s": float("nan")}, "max_queue_delay_s must be >= 0"),
        ({"max_batch_size": 8, "preferred_batch_sizes": (4, 16)}, r"preferred_batch_sizes must lie in 1\.\.max"),
        ({"preferred_batch_sizes": (0,)}, "preferred_batch_sizes"),
        ({"max_batch_tokens": -1}, "max_batch_tokens must be >= 0"),
    ],
)
def test_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchPolicy(**kwargs)


# -- DynamicBatcher ---------------------------------------------------------------------------------------------


class FakeModel:
    """``run``: the sum of each input's ids; an input holding BAD raises. Blocks while ``gate`` is closed."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []
        self.threads: set[int] = set()
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: list[list[int]]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.calls.append(inputs)
        self.started.set()
        assert self.gate.wait(10)
        if any(BAD in ids for ids in inputs):
            raise InvalidRequestError("input holds a bad id", "input")
        return [sum(ids) for ids in inputs]

    async def hold(self) -> None:
        """Close the gate and return once a batch is running (blocked in ``run``)."""
        self.gate.clear()
        self.started.clear()
        assert await asyncio.to_thread(self.started.wait, 10)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_results_come_back_in_input_order_and_requests_share_a_batch():
    async def main():
        model, seen = FakeModel(), []
        batcher = DynamicBatcher(
            model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.05), on_batch=lambda b, s: seen.append((b, s))
        )
        results = await asyncio.gather(*(batcher.submit("m", [[i, 1], [i], [i, i, i]]) for i in range(10)))
        assert results == [[i + 1, i, 3 * i] for i in range(10)]
        assert [len(c) for c in model.calls] == [30]
        ((batch, seconds),) = seen
        assert len(batch.inputs) == 30 and batch.tokens == 60 and seconds >= 0
        stats = batcher.stats()
        assert (stats.queued_inputs, stats.running_inputs, stats.batches_run, stats.inputs_run) == (0, 0, 1, 30)
        await batcher.close()

    run(main())


def test_inputs_arriving_during_a_run_form_the_next_batch():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.0))
        first = asyncio.create_task(batcher.submit("m", [[1]]))
        await model.hold()
        rest = [asyncio.create_task(batcher.submit("m", [[i]])) for i in range(2, 5)]
        await asyncio.sleep(0.01)
        assert batcher.stats().queued_inputs == 3 and batcher.stats().running_inputs == 1
        model.gate.set()
        assert await first == [1]
        assert [await t for t in rest] == [[2], [3], [4]]
        assert model.calls == [[[1]], [[2], [3], [4]]]
        await batcher.close()

    run(main())


def test_a_request_larger_than_a_batch_is_split_and_keys_never_mix():
    async def main():
        model, keys = FakeModel(), []
        batcher = DynamicBatcher(
            model, BatchPolicy(max_batch_size=4, max_queue_delay_s=0.01), on_batch=lambda b, s: keys.append(b.key)
        )
        big, other = await asyncio.gather(batcher.submit("a", [[i] for i in range(10)]), batcher.submit("b", [[7]]))
        assert big == list(range(10)) and other == [7]
        assert sorted(len(c) for c in model.calls) == [1, 2, 4, 4]
        assert sorted(keys) == ["a", "a", "a", "b"]
        await batcher.close()

    run(main())


def test_a_failing_input_fails_only_its_request():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.05))
        results = await asyncio.gather(
            batcher.submit("m", [[1], [2]]),
            batcher.submit("m", [[3], [BAD, 5]]),
            batcher.submit("m", [[6]]),
            batcher.submit("m", [[BAD]]),
            batcher.submit("m", [[8], [9]]),
            return_exceptions=True,
        )
        assert results[0] == [1, 2] and results[2] == [6] and results[4] == [8, 9]
        for error in (results[1], results[3]):
            assert type(error) is InvalidRequestError and error.param == "input"
        assert len(model.calls[0]) == 8  # one batch, then the bisection
        assert len(model.calls) < 2 * 8
        # the batcher goes on
        assert await batcher.submit("m", [[10]]) == [10]
        await batcher.close()

    run(main())


def test_a_cancelled_request_does_not_disturb_the_others():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.0))
        first = asyncio.create_task(batcher.submit("m", [[1]]))
        await model.hold()
        gone = asyncio.create_task(batcher.submit("m", [[100], [200]]))
        kept = asyncio.create_task(batcher.submit("m", [[3]]))
        await asyncio.sleep(0.01)
        assert batcher.stats().queued_inputs == 3
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.stats().queued_inputs == 1
        model.gate.set()
        assert await first == [1] and await kept == [3]
        assert gone.cancelled()
        assert [100] not in sum(model.calls, [])
        await batcher.close()

    run(main())


def test_close_fails_the_waiting_requests_and_lets_the_running_batch_finish():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.0))
        running = asyncio.create_task(batcher.submit("m", [[1]]))
        await model.hold()
        waiting = asyncio.create_task(batcher.submit("m", [[2]]))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(batcher.close())
        with pytest.raises(BatcherClosedError):
            await waiting
        assert not closing.done()  # the thread is still in the running batch
        model.gate.set()
        await closing
        assert await running == [1]
        with pytest.raises(BatcherClosedError):
            await batcher.submit("m", [[3]])
        await batcher.close()  # again: nothing to do

    run(main())


def test_run_is_always_called_on_one_thread_off_the_loop():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=2, max_queue_delay_s=0.0))
        for i in range(5):
            await asyncio.gather(*(batcher.submit("m", [[i]] * 3) for _ in range(2)))
        assert len(model.calls) >= 5
        assert len(model.threads) == 1 and threading.get_ident() not in model.threads
        await batcher.close()

    run(main())


def test_a_lone_request_runs_after_the_delay():
    async def main():
        model = FakeModel()
        batcher = DynamicBatcher(model, BatchPolicy(max_batch_size=64, max_queue_delay_s=0.05))
        start = time.monotonic()
        assert await batcher.submit("m", [[2, 3]]) == [5]
        assert 0.04 <= time.monotonic() - start < 2.0
        assert await batcher.submit("m", []) == []
        await batcher.close()

    run(main())
