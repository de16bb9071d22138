"""A light HTTP/1.1 client for the load generators: POST JSON, read the response body line by line, or whole.

The load generator shares the machine with what it measures. On a small machine every microsecond it spends
per token is taken from the engine: at 16 streams httpx's streaming reader cost 170-180 µs of CPU a token,
this one 40-60 µs (docs/benchmarks.md). It speaks only what the benchmark needs: one origin (``http`` or
``https``, certificates verified as ``ssl.create_default_context`` does), requests with a JSON body,
responses framed by ``Transfer-Encoding: chunked``, ``Content-Length`` or the connection's end, and
connections kept alive between requests. The chat benchmark's warm-up and ``/ready`` still go through httpx.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

MAX_LINE = 1 << 20
"""The longest header or chunk-size line accepted, in bytes."""


class HttpStreamError(Exception):
    """The server's response broke HTTP/1.1 framing, or the connection ended inside it."""


class Response:
    """One response: its status and headers, then its body, read once, as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, status: int, headers: dict[str, str]):
        self.status = status
        self.headers = headers
        self._reader = reader
        self.complete = False  # the whole body has been read: the connection may carry another request

    async def _pieces(self) -> AsyncIterator[bytes]:
        """The body as the framing delivers it."""
        reader = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readuntil(b"\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpStreamError(f"bad chunk size line {size_line[:40]!r}") from None
                if size == 0:
                    while (await reader.readuntil(b"\n")).strip():  # trailer fields, then the blank line
                        pass
                    break
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise HttpStreamError(f"the connection ended {left} bytes before the body's end")
                left -= len(data)
                yield data
        else:  # the body ends with the connection
            while data := await reader.read(1 << 16):
                yield data
            return
        self.complete = True

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines, without their line endings, each as soon as it is whole (the last even if not)."""
        rest = b""
        async for data in self._pieces():
            *whole, rest = (rest + data).split(b"\n")
            for line in whole:
                yield line.removesuffix(b"\r")
        if rest:
            yield rest.removesuffix(b"\r")

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self._pieces()])


class StreamingClient:
    """POSTs JSON to one origin over HTTP/1.1, keeping connections alive between requests."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.base_path = parts.path.rstrip("/")
        fields = {"Host": parts.netloc, "Content-Type": "application/json", "Accept": "text/event-stream"}
        fields.update(headers or {})
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_LINE)

    @asynccontextmanager
    async def post(self, path: str, body: Any) -> AsyncIterator[Response]:
        """POST ``body`` as JSON to ``path``; the response, its body to be read inside the ``async with``."""
        payload = json.dumps(body).encode()
        head = f"POST {self.base_path}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(payload)}\r\n\r\n"
        reader, writer = await self._connection()
        response: Response | None = None
        try:
            writer.write(head.encode("latin-1") + payload)
            response = await _read_head(reader)
            yield response
        finally:
            keep = response is not None and response.complete
            keep = keep and response.headers.get("connection", "").lower() != "close"
            if keep:
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def aclose(self) -> None:
        """Close the idle connections."""
        while self._idle:
            self._idle.pop()[1].close()


async def _read_head(reader: asyncio.StreamReader) -> Response:
    """The status line and header fields of a response."""
    status_line = await reader.readuntil(b"\n")
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpStreamError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    headers: dict[str, str] = {}
    while line := (await reader.readuntil(b"\n")).strip():
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpStreamError(f"bad header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    if parts[0] == b"HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return Response(reader, int(parts[1]), headers)
