"""The gateway's HTTP listener: its accepted connections send each write at once (Nagle's algorithm off)."""

from __future__ import annotations

import asyncio
import socket

from fleetserve.gateway.main import _listen


def test_accepted_connections_have_nagle_off_and_the_fixed_send_buffer():
    async def main():
        seen: dict[str, int] = {}

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            writer.close()

        listener = _listen("127.0.0.1", 0, 64 * 1024)
        server = await asyncio.start_server(accept, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()
        return seen

    seen = asyncio.run(main())
    assert seen["nodelay"] != 0
    assert seen["sndbuf"] == 2 * 64 * 1024  # Linux doubles what it is given, for its own bookkeeping
