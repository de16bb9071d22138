"""Chat templating and tokenization off the event loop: a pool of helper processes speaking JSON lines.

``--preprocess-workers N`` starts N processes (``python -m fleetserve.gateway.preprocess``); each reads one JSON
request per line on stdin and answers one JSON line on stdout. No pickle crosses the pipe. With N = 0 the
gateway tokenizes inline. Detokenization stays in the gateway: it is incremental, a few microseconds a token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from fleetserve.errors import FleetServeError, InvalidRequestError


class PreprocessPool:
    """N helper processes; ``encode_chat`` and ``encode`` are awaited, round-robin over them."""

    def __init__(self, size: int):
        assert size > 0
        self.size = size
        self._procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._turn = itertools.count()

    async def start(self) -> None:
        for _ in range(self.size):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fleetserve.gateway.preprocess",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=64 * 2**20,
            )
            self._procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            reply = json.loads(line)
            fut = self._pending.pop(reply["id"], None)
            if fut is None or fut.done():
                continue
            if "error" in reply:
                err = reply["error"]
                fut.set_exception(InvalidRequestError(err["message"], err.get("param")))
            else:
                fut.set_result(reply["ids"])
        for fut in list(self._pending.values()):  # the process died: nobody will answer these
            if not fut.done():
                fut.set_exception(FleetServeError("a preprocessing process exited"))

    async def _call(self, request: dict[str, Any]) -> list[int]:
        proc = self._procs[next(self._turn) % len(self._procs)]
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"id": rid, **request}).encode() + b"\n")
        await proc.stdin.drain()
        return await fut

    async def encode_chat(self, tokenizer_dir: Path, messages: list[dict]) -> list[int]:
        return await self._call({"op": "chat", "dir": str(tokenizer_dir), "messages": messages})

    async def encode(self, tokenizer_dir: Path, text: str) -> list[int]:
        return await self._call({"op": "encode", "dir": str(tokenizer_dir), "text": text})

    async def close(self) -> None:
        for proc in self._procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
        for task in self._readers:
            task.cancel()


def _serve() -> None:
    """The helper process: answer JSON-line requests until stdin closes."""
    from fleetserve.text.tokenizer import Tokenizer

    tokenizers: dict[str, Tokenizer] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            tok = tokenizers.get(request["dir"])
            if tok is None:
                tok = tokenizers[request["dir"]] = Tokenizer.from_dir(request["dir"])
            ids = tok.encode_chat(request["messages"]) if request["op"] == "chat" else tok.encode(request["text"])
            reply = {"id": request["id"], "ids": ids}
        except InvalidRequestError as exc:
            reply = {"id": request["id"], "error": {"message": str(exc), "param": exc.param}}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
