"""Prompt tokenization kept off the event loop: the Preprocessor (inline, in a thread, or in the helper pool) and
the supervised pool of helper processes speaking JSON lines.

The event loop also serves the Control service, so a long tokenization there would hold up heartbeats and make
workers look dead. The Preprocessor tokenizes small prompts inline (a thread hop costs more than they do), large
ones in a worker thread with the tokenizer's GIL-free call, and every prompt in the helper pool when there is one.

``--preprocess-workers N`` starts N helpers (``python -m fleetserve.gateway.preprocess``); each reads one JSON
request per line on stdin and answers one JSON line on stdout, in order. No pickle crosses the pipe. The pool
supervises them: every call has a deadline (a helper that misses it is killed), a helper that exits is started
again and the calls it held fail with PreprocessError, and a reply over the size cap fails its request alone.
Detokenization stays in the gateway: it is incremental, a few microseconds a token.

The helpers keep their own pipes rather than ``fleetserve.supervisor``: its children read no stdin and share one
text stream for stdout and stderr, while this protocol needs stdin and a stdout of replies only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetserve.errors import FleetServeError, InvalidRequestError, PreprocessError, UnknownModelError
from fleetserve.text.tokenizer import LONG_TEXT_CHARS

if TYPE_CHECKING:
    from fleetserve.gateway.tokenizers import TokenizerStore
    from fleetserve.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INLINE_MAX_CHARS = LONG_TEXT_CHARS
"""Prompts up to this many characters are tokenized on the event loop; longer ones in a thread (where
``Tokenizer.encode`` releases the GIL for them)."""
CALL_TIMEOUT_S = 60.0
"""The most a call to the helper pool may take; the helper that holds it is then killed and started again."""
MAX_REPLY_BYTES = 64 * 2**20
"""The largest reply line a helper may send (about nine million token ids)."""
RESTART_PAUSE_S = 1.0
"""A helper that exits sooner than this after starting waits this long before it is started again."""
CLOSE_GRACE_S = 5.0


# -- the Preprocessor -----------------------------------------------------------------------------------------------


def chat_chars(messages: Any) -> int:
    """The characters of a chat's message contents (what its tokenization costs grows with)."""
    if not isinstance(messages, list):
        return 0
    return sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


class Preprocessor:
    """A model's prompt to token ids, never holding the event loop for long: the helper pool when there is one,
    else inline for prompts up to ``inline_max_chars`` and a worker thread beyond."""

    def __init__(
        self, tokenizers: TokenizerStore, pool: PreprocessPool | None = None, inline_max_chars: int = INLINE_MAX_CHARS
    ):
        self.tokenizers = tokenizers
        self.pool = pool
        self.inline_max_chars = inline_max_chars

    def _tokenizer(self, model: str) -> Tokenizer:
        tok = self.tokenizers.get(model)
        if tok is None:
            raise UnknownModelError(f"The model '{model}' has no tokenizer here yet.")
        return tok

    async def encode_chat(self, model: str, messages: list[dict]) -> list[int]:
        """The token ids of ``messages`` rendered with the model's chat template."""
        tok = self._tokenizer(model)
        if self.pool is not None:
            return await self.pool.encode_chat(self.tokenizers.folders[model], messages)
        if chat_chars(messages) <= self.inline_max_chars:
            return tok.encode_chat(messages)
        return await asyncio.to_thread(tok.encode_chat, messages)  # long text: encoded without the GIL

    async def encode(self, model: str, text: str) -> list[int]:
        """The token ids of a plain prompt."""
        tok = self._tokenizer(model)
        if self.pool is not None:
            return await self.pool.encode(self.tokenizers.folders[model], text)
        if not isinstance(text, str) or len(text) <= self.inline_max_chars:
            return tok.encode(text)
        return await asyncio.to_thread(tok.encode, text)

    async def encode_inputs(self, model: str, texts: list[str]) -> list[list[int]]:
        """The token ids of each of an embedding request's inputs, special tokens included."""
        tok = self._tokenizer(model)
        if self.pool is not None:
            return await self.pool.encode_inputs(self.tokenizers.folders[model], texts)
        if sum(len(t) for t in texts if isinstance(t, str)) <= self.inline_max_chars:
            return tok.encode_inputs(texts)
        return await asyncio.to_thread(tok.encode_inputs, texts)


# -- the helper pool ------------------------------------------------------------------------------------------------


class _TooLong(Exception):
    """A reply line was over the cap (and has been skipped)."""


async def _next_line(stream: asyncio.StreamReader) -> bytes | None:
    """The next line of ``stream``; None at its end. A line over the stream's limit is skipped and raises
    _TooLong, so the lines after it are read as usual."""
    try:
        return await stream.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None  # the end (a last line cut short is no reply either)
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:  # drop the long line, a buffer at a time
        try:
            await stream.readexactly(consumed)
            await stream.readuntil(b"\n")
            raise _TooLong
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed


@dataclass
class _Helper:
    """One helper slot: its current process, the reader of its replies and the calls it has not answered yet (in
    the order it will answer them)."""

    slot: int
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task | None = None
    started: float = 0.0
    pending: OrderedDict[int, tuple[asyncio.Future, str]] = field(default_factory=OrderedDict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def fail_all(self, error: FleetServeError) -> None:
        pending, self.pending = self.pending, OrderedDict()
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)


class PreprocessPool:
    """N supervised helper processes; ``encode_chat`` and ``encode`` go to the helper with the fewest calls
    waiting. ``argv`` replaces the helper's command line (tests give misbehaving ones)."""

    def __init__(
        self,
        size: int,
        *,
        argv: Sequence[str] | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ):
        if size < 1:
            raise ValueError("a preprocess pool needs at least one process")
        self.size = size
        self.argv = list(argv or [sys.executable, "-m", __name__, "--max-reply-bytes", str(max_reply_bytes)])
        self.call_timeout_s = call_timeout_s
        self.max_reply_bytes = max_reply_bytes
        self.restarts = 0
        """How many times a helper was started again after it exited."""
        self._helpers = [_Helper(i) for i in range(size)]
        self._ids = itertools.count()
        self._turn = itertools.count()
        self._started = asyncio.Event()
        self._closing = False

    @property
    def pids(self) -> list[int | None]:
        """The helpers' current process ids (None while one is being started again)."""
        return [h.proc.pid if h.alive and h.proc else None for h in self._helpers]

    async def start(self) -> None:
        for helper in self._helpers:
            await self._spawn(helper)

    async def _spawn(self, helper: _Helper) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=self.max_reply_bytes + 1,
        )
        helper.proc, helper.started = proc, asyncio.get_running_loop().time()
        helper.reader = asyncio.create_task(self._supervise(helper, proc), name=f"preprocess-{helper.slot}")
        self._started.set()

    async def _supervise(self, helper: _Helper, proc: asyncio.subprocess.Process) -> None:
        """Deliver the helper's replies until it exits; then fail what it held and start it again."""
        await self._replies(helper, proc)
        code = await proc.wait()
        if helper.proc is proc:
            helper.fail_all(PreprocessError(f"the preprocessing process exited (code {code}) before answering"))
        if self._closing:
            return
        log.warning("preprocessing process %d exited with code %s; starting it again", proc.pid, code)
        self.restarts += 1
        while not self._closing:
            if asyncio.get_running_loop().time() - helper.started < RESTART_PAUSE_S:
                await asyncio.sleep(RESTART_PAUSE_S)
            try:
                await self._spawn(helper)
                return
            except OSError as exc:
                log.error("cannot start a preprocessing process: %s", exc)
                helper.started = asyncio.get_running_loop().time()

    async def _replies(self, helper: _Helper, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await _next_line(proc.stdout)
            except _TooLong:  # the oldest call is the one it answered
                if helper.pending:
                    fut, param = helper.pending.popitem(last=False)[1]
                    if not fut.done():
                        fut.set_exception(_too_long(self.max_reply_bytes, param))
                continue
            if line is None:
                return
            try:
                reply = json.loads(line)
                entry = helper.pending.pop(reply["id"], None)
            except (ValueError, KeyError, TypeError):
                log.error("preprocessing process %d wrote something that is not a reply; restarting it", proc.pid)
                proc.kill()
                return
            if entry is not None and not entry[0].done():
                _deliver(entry[0], reply)

    def _pick(self) -> _Helper | None:
        """The live helper with the fewest calls waiting (ties in turn), or None while none is alive."""
        start = next(self._turn)
        live = [self._helpers[(start + i) % self.size] for i in range(self.size)]
        live = [h for h in live if h.alive]
        return min(live, key=lambda h: len(h.pending)) if live else None

    async def _helper(self) -> _Helper:
        while (helper := self._pick()) is None:
            if self._closing:
                raise PreprocessError("the preprocessing pool is closed")
            self._started.clear()
            await self._started.wait()
        return helper

    async def _call(self, request: dict[str, Any], param: str) -> Any:
        """Send ``request`` to a helper and await its token ids, within the call deadline."""
        sent: list[tuple[_Helper, asyncio.subprocess.Process, int]] = []
        try:
            return await asyncio.wait_for(self._send(request, param, sent), self.call_timeout_s)
        except asyncio.TimeoutError:
            if sent:
                helper, proc, rid = sent[0]
                if helper.proc is proc and helper.pending.pop(rid, None) is not None:
                    log.warning(
                        "preprocessing process %d gave no answer in %gs; restarting it", proc.pid, self.call_timeout_s
                    )
                    proc.kill()  # its other calls fail as it exits; the supervisor starts it again
            raise PreprocessError(f"tokenizing the prompt took longer than {self.call_timeout_s:g}s") from None

    async def _send(self, request: dict[str, Any], param: str, sent: list) -> Any:
        helper = await self._helper()
        proc = helper.proc
        assert proc is not None and proc.stdin is not None
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        helper.pending[rid] = (fut, param)
        sent.append((helper, proc, rid))
        try:
            proc.stdin.write(json.dumps({"id": rid, **request}).encode() + b"\n")
            await proc.stdin.drain()
        except ConnectionError:
            helper.pending.pop(rid, None)
            raise PreprocessError("the preprocessing process exited before it took the request") from None
        return await fut

    async def encode_chat(self, tokenizer_dir: Path, messages: list[dict]) -> list[int]:
        return await self._call({"op": "chat", "dir": str(tokenizer_dir), "messages": messages}, "messages")

    async def encode(self, tokenizer_dir: Path, text: str) -> list[int]:
        return await self._call({"op": "encode", "dir": str(tokenizer_dir), "text": text}, "prompt")

    async def encode_inputs(self, tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
        return await self._call({"op": "inputs", "dir": str(tokenizer_dir), "texts": texts}, "input")

    async def close(self) -> None:
        self._closing = True
        self._started.set()
        for helper in self._helpers:
            if helper.alive and helper.proc and helper.proc.stdin is not None:
                helper.proc.stdin.close()
        for helper in self._helpers:
            if helper.proc is None:
                continue
            try:
                await asyncio.wait_for(helper.proc.wait(), CLOSE_GRACE_S)
            except asyncio.TimeoutError:
                helper.proc.kill()
                await helper.proc.wait()
        for helper in self._helpers:
            if helper.reader is not None:
                helper.reader.cancel()
            helper.fail_all(PreprocessError("the preprocessing pool is closed"))


def _too_long(cap: int, param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The prompt's token ids are more than a {cap}-byte reply can carry: the prompt is far too long.", param
    )


def _deliver(fut: asyncio.Future, reply: dict[str, Any]) -> None:
    """Settle a call's future with a helper's reply: its ids, or its error as a typed error."""
    error = reply.get("error")
    if isinstance(error, dict) and error.get("kind") == "invalid":
        fut.set_exception(InvalidRequestError(str(error.get("message")), error.get("param")))
    elif isinstance(error, dict):
        fut.set_exception(PreprocessError(str(error.get("message"))))
    elif isinstance(reply.get("ids"), list):
        fut.set_result(reply["ids"])
    else:
        fut.set_exception(PreprocessError("the preprocessing process sent a malformed reply"))


# -- the helper process ---------------------------------------------------------------------------------------------


def answer(request: dict[str, Any], tokenizers: dict[str, Tokenizer], max_reply_bytes: int) -> bytes:
    """The reply line (with its newline) to one request; ``tokenizers`` caches them by folder."""
    from fleetserve.text.tokenizer import Tokenizer

    rid = request["id"]
    try:
        tok = tokenizers.get(request["dir"])
        if tok is None:
            tok = tokenizers[request["dir"]] = Tokenizer.from_dir(request["dir"])
        op = request["op"]
        if op == "chat":
            ids = tok.encode_chat(request["messages"])
        elif op == "inputs":
            ids = tok.encode_inputs(request["texts"])
        else:
            ids = tok.encode(request["text"])
        line = json.dumps({"id": rid, "ids": ids}).encode()
        if len(line) >= max_reply_bytes:
            param = {"chat": "messages", "inputs": "input"}.get(op, "prompt")
            raise _too_long(max_reply_bytes, param)
    except InvalidRequestError as exc:
        line = json.dumps({"id": rid, "error": {"kind": "invalid", "message": str(exc), "param": exc.param}}).encode()
    except (FleetServeError, ValueError, OSError) as exc:
        line = json.dumps({"id": rid, "error": {"kind": "failed", "message": f"tokenization failed: {exc}"}}).encode()
    return line + b"\n"


def _serve(argv: list[str]) -> None:
    """The helper process: answer JSON-line requests, in order, until stdin closes."""
    max_reply_bytes = int(argv[argv.index("--max-reply-bytes") + 1]) if "--max-reply-bytes" in argv else MAX_REPLY_BYTES
    tokenizers: dict[str, Tokenizer] = {}
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        out.write(answer(json.loads(line), tokenizers, max_reply_bytes))
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1:])
