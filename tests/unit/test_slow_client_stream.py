"""A streamed response cuts off a client whose send waits longer than the limit, and only such a client."""

from __future__ import annotations

import asyncio

from fleetserve.gateway.streaming import SlowClientStreamingResponse


def _run(send_delays: list[float], timeout_s: float) -> tuple[SlowClientStreamingResponse, list[dict], bool]:
    """Stream one chunk per delay through a send that takes that long; the response, what was sent, and whether
    the body was closed."""
    closed = False

    async def body():
        nonlocal closed
        try:
            for i in range(len(send_delays)):
                yield f"chunk {i}\n"
        finally:
            closed = True

    sent: list[dict] = []
    delays = iter([0.0, *send_delays, 0.0])  # the start message, the chunks, the final message

    async def send(message: dict) -> None:
        await asyncio.sleep(next(delays))
        sent.append(message)

    async def main():
        response = SlowClientStreamingResponse(body(), slow_client_timeout_s=timeout_s, request_id="r")
        await response.stream_response(send)
        return response

    response = asyncio.run(main())
    return response, sent, closed


def test_a_reading_client_gets_every_chunk_even_when_the_stream_outlasts_the_limit():
    response, sent, closed = _run([0.05] * 8, timeout_s=0.15)  # 0.4 s in all, no send over 0.15 s
    assert not response.cut_off and closed
    assert [m.get("body") for m in sent[1:]] == [f"chunk {i}\n".encode() for i in range(8)] + [b""]
    assert sent[-1]["more_body"] is False


def test_a_send_that_waits_past_the_limit_cuts_the_stream_off():
    response, sent, closed = _run([0.0, 0.0, 5.0, 0.0], timeout_s=0.2)
    assert response.cut_off and closed
    # The start and two chunks went out; the stalled one never completed and no final message was sent.
    assert [m.get("body") for m in sent[1:]] == [b"chunk 0\n", b"chunk 1\n"]


def test_no_limit_waits_for_a_slow_send():
    response, sent, closed = _run([0.3, 0.0], timeout_s=0.0)
    assert not response.cut_off and closed and sent[-1]["more_body"] is False
