"""The benchmark's light HTTP/1.1 streaming client against a real socket server that answers with fixed bytes."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetserve.bench.gateway_client import GatewayClient
from fleetserve.bench.http_client import HttpStreamError, StreamingClient
from fleetserve.bench.traces import StreamTrace


class CannedServer:
    """A TCP server answering each request on a connection with the next of ``answers`` (raw bytes)."""

    def __init__(self, answers: list[bytes]):
        self.answers = list(answers)
        self.requests: list[tuple[bytes, dict]] = []
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                self.requests.append((head, json.loads(await reader.readexactly(int(length.split(b":")[1])))))
                answer = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or answer.startswith(b"HTTP/1.0"):
                    return
            await reader.read()  # the client's turn to close (or to time out)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/base/"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


def _chunked(*pieces: bytes, extra_header: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra_header + b"\r\n" + body


async def _lines(client: StreamingClient, body: dict) -> tuple[int, list[bytes]]:
    async with client.post("/v1/x", body) as response:
        return response.status, [line async for line in response.lines()]


def test_chunked_lines_split_across_chunks_and_a_kept_connection():
    async def main():
        first = _chunked(b'data: {"a"', b": 1}\r\n\r\ndata: [DONE]\n\n")
        second = _chunked(b"data: 2\n\n", extra_header=b"X-Other: y\r\n")
        server = CannedServer([first, second])
        async with server as url:
            client = StreamingClient(url, {"Authorization": "Bearer k"})
            assert await _lines(client, {"n": 1}) == (200, [b'data: {"a": 1}', b"", b"data: [DONE]", b""])
            assert await _lines(client, {"n": 2}) == (200, [b"data: 2", b""])
            await client.aclose()
        assert server.connections == 1  # the second request went on the first one's connection
        (head, body), (_, body2) = server.requests
        assert head.startswith(b"POST /base/v1/x HTTP/1.1\r\n") and b"Authorization: Bearer k\r\n" in head
        assert (body, body2) == ({"n": 1}, {"n": 2})

    asyncio.run(main())


def test_content_length_and_connection_close_bodies():
    async def main():
        error = b'{"error": {"message": "no"}}'
        answers = [
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(error), error),
            b"HTTP/1.0 200 OK\r\n\r\nline one\nline two",  # the body ends with the connection
        ]
        server = CannedServer(answers)
        async with server as url:
            client = StreamingClient(url)
            async with client.post("/v1/x", {}) as response:
                assert (response.status, await response.read()) == (400, error)
            assert await _lines(client, {}) == (200, [b"line one", b"line two"])
        assert server.connections == 2 and not client._idle

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", HttpStreamError, "status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", HttpStreamError, "chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nab",
            asyncio.IncompleteReadError,
            "expected bytes",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc", HttpStreamError, "7 bytes"),
    ],
)
def test_broken_framing_is_an_error_and_the_connection_is_not_kept(answer, error, match):
    async def main():
        server = CannedServer([answer])
        async with server as url:
            client = StreamingClient(url)
            with pytest.raises(error, match=match):
                await _lines(client, {})
            assert not client._idle

    asyncio.run(main())


def test_only_http_urls():
    with pytest.raises(ValueError, match="not an http"):
        StreamingClient("ftp://example.com")


def _event(delta: str | None, finish: str | None = None, usage: dict | None = None) -> bytes:
    event = {"choices": [{"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}]}
    if usage:
        event = {"choices": [], "usage": usage}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _send(answers: list[bytes], timeout_s: float = 30.0) -> StreamTrace:
    """One benchmark request through GatewayClient against a canned server; its trace."""

    async def main():
        async with CannedServer(answers) as url:
            client = GatewayClient(None, url, "key", "m", 2, timeout_s)
            trace = StreamTrace("r", 0)
            await client.send([{"role": "user", "content": "hi"}], trace)
            await client.close()
            return trace

    return asyncio.run(main())


def test_the_gateway_client_times_a_whole_stream():
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 3}}
    trace = _send(
        [_chunked(_event("a"), _event("b"), _event(None, "length"), _event(None, usage=usage), b"data: [DONE]\n\n")]
    )
    assert trace.error is None and trace.finish_reason == "length" and trace.status == 200
    assert (trace.output_tokens, trace.prompt_tokens, trace.cached_tokens) == (2, 5, 3)
    assert len(trace.token_times) == 2 and trace.first_token == trace.token_times[0] <= trace.finish_time


@pytest.mark.parametrize(
    ("answers", "timeout_s", "error"),
    [
        ([_chunked(_event("a"), b"data: [DONE]\n\n")], 30.0, "without a finish_reason"),
        ([_chunked(_event("a"), b'data: {"error": {"message": "boom"}}\n\n')], 30.0, "error in stream: boom"),
        ([_chunked(b"data: {not json\n\n")], 30.0, "bad JSON in stream"),
        (
            [b"HTTP/1.1 503 Busy\r\nContent-Length: 29\r\n\r\n" + b'{"error": {"message": "full"}}'[:29]],
            30.0,
            "HTTP 503",
        ),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"], 0.5, "no whole response within 0.5 s"),
    ],
)
def test_the_gateway_client_records_what_went_wrong(answers, timeout_s, error):
    trace = _send(answers, timeout_s)
    assert trace.finish_reason == "error" and error in trace.error


def test_the_gateway_client_records_a_refused_connection():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        trace = StreamTrace("r", 0)
        await GatewayClient(None, f"http://127.0.0.1:{port}", None, "m", 2).send([], trace)
        return trace

    trace = asyncio.run(main())
    assert trace.finish_reason == "error" and "ConnectionRefusedError" in trace.error
