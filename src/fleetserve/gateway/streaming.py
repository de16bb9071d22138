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

from fastapi.responses import StreamingResponse
from starlette.types import Send

log = logging.getLogger(__name__)


class SlowClientStreamingResponse(StreamingResponse):
    """A StreamingResponse whose every send must complete within ``slow_client_timeout_s`` (0: no limit)."""

    def __init__(self, *args, slow_client_timeout_s: float = 0.0, request_id: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.slow_client_timeout_s = slow_client_timeout_s
        self.request_id = request_id
        self.cut_off = False

    async def stream_response(self, send: Send) -> None:
        timeout = self.slow_client_timeout_s or None
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                if not isinstance(chunk, bytes | memoryview):
                    chunk = chunk.encode(self.charset)
                try:
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": chunk, "more_body": True}), timeout
                    )
                except asyncio.TimeoutError:
                    self.cut_off = True
                    log.warning(
                        "request %s: the client read nothing for %.1fs; cutting it off", self.request_id, timeout
                    )
                    # Returning without the final body message makes the server drop the connection.
                    return
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # aborts the request on its worker when it is still running
        await send({"type": "http.response.body", "body": b"", "more_body": False})
