"""A reconnect loop (the heartbeat relay's, a worker agent's, a node agent's) stops when its task is cancelled, even
when gRPC turns the cancel into an error of the call: otherwise it would try again forever."""

from __future__ import annotations

import asyncio
import sys

import pytest

from fleetserve.protocol.cancellation import raise_if_cancelling

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is Python 3.11 and later")


async def _swallows_then_checks(outcome: list[str]) -> None:
    asyncio.current_task().cancel()
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        outcome.append("swallowed")  # as a gRPC call can, answering the cancel with an error of its own
    raise_if_cancelling()
    outcome.append("went on")


def test_a_swallowed_cancel_still_stops_the_loop():
    async def main() -> list[str]:
        outcome: list[str] = []
        task = asyncio.create_task(_swallows_then_checks(outcome))
        with pytest.raises(asyncio.CancelledError):
            await task
        return outcome

    assert asyncio.run(main()) == ["swallowed"]


def test_no_cancel_no_stop():
    async def main() -> None:
        raise_if_cancelling()

    asyncio.run(main())
