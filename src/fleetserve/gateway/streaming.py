"""Streamed responses that cut off a client who stops reading.

Each stream's buffer is bounded: the server's write buffer for the connection has a high-water mark, and when a
client stops reading, the kernel's socket buffers and then that buffer fill, and sending the next chunk waits.
If it waits longer than ``slow_client_timeout_s``, the stream is cut off: the generator behind it is closed
(which aborts the request on its worker) and the connection is dropped. Other streams are not slowed meanwhile:
each is its own task, and a worker's engine never waits for a reader.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Send

log = logging.getLogger(__name__)


class _SendWatch:
    """Cuts off a stream (cancels ``scope``) whose current send has waited ``timeout_s``. One timer a stream,
    re-armed only when it fires: marking a send costs a clock read and two assignments, where a timeout of its own per send
    (``asyncio.wait_for``) cost a task and a timer per token."""

    def __init__(self, scope: anyio.CancelScope, timeout_s: float):
        self.scope = scope
        self.timeout_s = timeout_s
        self.since: float | None = None
        """When the send under way began (loop time); None between sends."""
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.since is not None and now - self.since >= self.timeout_s:
            self._timer = None
            self.scope.cancel()
            return
        self._timer = self._loop.call_at((self.since or now) + self.timeout_s, self._check)

    def sending(self) -> None:
        """A send begins."""
        self.since = self._loop.time()

    def sent(self) -> None:
        """The send under way is done."""
        self.since = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class SlowClientStreamingResponse(StreamingResponse):
    """A StreamingResponse whose every send must complete within ``slow_client_timeout_s`` (0: no limit)."""

    def __init__(self, *args, slow_client_timeout_s: float = 0.0, request_id: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.slow_client_timeout_s = slow_client_timeout_s
        self.request_id = request_id
        self.cut_off = False

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watch: _SendWatch | None = None
        try:
            with anyio.CancelScope() as scope:
                if self.slow_client_timeout_s:
                    watch = _SendWatch(scope, self.slow_client_timeout_s)
                async for chunk in self.body_iterator:
                    if not isinstance(chunk, bytes | memoryview):
                        chunk = chunk.encode(self.charset)
                    if watch is not None:
                        watch.sending()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if watch is not None:
                        watch.sent()
            if scope.cancelled_caught:
                self.cut_off = True
                log.warning(
                    "request %s: the client read nothing for %.1fs; cutting it off",
                    self.request_id,
                    self.slow_client_timeout_s,
                )
                # Returning without the final body message makes the server drop the connection.
                return
        finally:
            if watch is not None:
                watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # aborts the request on its worker when it is still running
        await send({"type": "http.response.body", "body": b"", "more_body": False})
