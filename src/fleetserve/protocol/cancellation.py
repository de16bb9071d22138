"""Cancellation that gRPC's asyncio calls can hide.

A task cancelled while a grpc.aio call is starting or ending can see the cancel come back as an ``AioRpcError``
(the call's own cancellation) instead of a ``CancelledError``. A reconnect loop that catches the error and tries
again would then never stop. The task still counts the request (``Task.cancelling``, Python 3.11 and later), so
such a loop asks it before it waits to try again.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError when the current task has been asked to stop (a no-op before Python 3.11)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError
