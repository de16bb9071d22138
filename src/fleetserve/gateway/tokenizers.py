"""Per-model tokenizers on the gateway, fetched from the first worker of each model over gRPC.

The gateway needs no model files: a worker sends its tokenizer files when it registers, and every later worker
of the same model must report the same tokenizer fingerprint, or it is refused.

What a worker sends is untrusted. The files are checked before anything touches the disk: known names only, a
size cap per file and in total, and a fingerprint that is lowercase sha256 hex. They are written into a fresh
folder inside the cache (new files only, never through a link), loaded from there, and the fingerprint is computed
again from what was loaded: it must equal the one the worker sent and the one it registered with. Only then does
the folder take its place in the cache under the fingerprint's name. Nothing is written, renamed or read outside
the cache folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import grpc

from fleetserve.gateway.registry import WorkerRecord
from fleetserve.model_files import cache_root
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.text.tokenizer import TOKENIZER_FILES, Tokenizer

log = logging.getLogger(__name__)

MAX_FILE_BYTES = {"tokenizer.json": 32 * 2**20}
"""Per-file size caps; a name not listed here gets DEFAULT_MAX_FILE_BYTES."""
DEFAULT_MAX_FILE_BYTES = 8 * 2**20
MAX_TOTAL_BYTES = 32 * 2**20
"""The most bytes of tokenizer files one worker may send."""
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
"""What ``Tokenizer.fingerprint`` produces: sha256 as lowercase hex."""
FETCH_TIMEOUT_S = 30.0


def check_fingerprint(value: str, what: str) -> str:
    """``value`` if it is a well-formed tokenizer fingerprint; ValueError otherwise."""
    if not isinstance(value, str) or FINGERPRINT.fullmatch(value) is None:
        shown = repr(value[:80]) if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{what} is not a tokenizer fingerprint (64 lowercase hex digits): {shown}")
    return value


def check_files(files: dict[str, bytes]) -> None:
    """ValueError unless every name is a known tokenizer file, each file and the whole are within their caps, and
    tokenizer.json is there."""
    total = 0
    for name, data in files.items():
        if name not in TOKENIZER_FILES:
            raise ValueError(
                f"the worker sent a file the gateway does not accept: {name[:80]!r} "
                f"(accepted: {', '.join(sorted(TOKENIZER_FILES))})"
            )
        cap = MAX_FILE_BYTES.get(name, DEFAULT_MAX_FILE_BYTES)
        if len(data) > cap:
            raise ValueError(f"the worker's {name} is {len(data)} bytes, over the {cap}-byte limit")
        total += len(data)
    if total > MAX_TOTAL_BYTES:
        raise ValueError(
            f"the worker's tokenizer files are {total} bytes in all, over the {MAX_TOTAL_BYTES}-byte limit"
        )
    if "tokenizer.json" not in files:
        raise ValueError("the worker sent no tokenizer.json")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` and write ``data``; an existing file or link there is an error, never followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _exists(path: Path) -> bool:
    """Whether something is at ``path``: a real folder (True), nothing (False); a link or a file is a ValueError
    (never followed, never replaced)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{path} in the tokenizer cache is not a folder (a link or a file): refusing to use it")
    return True


def _check_entries(folder: Path) -> None:
    """ValueError unless ``folder`` holds only regular files (no links) with accepted names."""
    for entry in os.scandir(folder):
        if entry.name not in TOKENIZER_FILES or not entry.is_file(follow_symlinks=False):
            raise ValueError(f"{entry.path} in the tokenizer cache is not a tokenizer file")


class TokenizerStore:
    """model name -> Tokenizer, plus each model's context window."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or cache_root() / "gateway-tokenizers"
        self.tokenizers: dict[str, Tokenizer] = {}
        self.fingerprints: dict[str, str] = {}
        self.max_model_len: dict[str, int] = {}
        self.folders: dict[str, Path] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def on_register(self, record: WorkerRecord) -> None:
        """Fetch the model's tokenizer from its first worker; refuse a worker whose tokenizer differs, or whose
        files are malformed (ValueError, with the reason)."""
        info = record.info
        if self._known(info) is not None:
            return
        async with self._locks.setdefault(info.model, asyncio.Lock()):  # another worker may finish first
            if self._known(info) is not None:
                return
            registered = check_fingerprint(info.tokenizer_fingerprint, f"worker {info.name}'s registered fingerprint")
            try:
                files = await record.stub.GetTokenizer(pb.TokenizerRequest(), timeout=FETCH_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise ValueError(f"could not fetch the tokenizer of worker {info.name}: {exc.details()}") from None
            sent = check_fingerprint(files.fingerprint, f"the fingerprint worker {info.name} sent with its files")
            if sent != registered:
                raise ValueError(
                    f"worker {info.name} registered tokenizer {registered[:12]} but sent the files of {sent[:12]}"
                )
            contents = dict(files.files)
            check_files(contents)
            try:
                target, tok = await asyncio.to_thread(self._install, sent, contents)
            except OSError as exc:
                raise ValueError(f"cannot keep worker {info.name}'s tokenizer in {self.folder}: {exc}") from None
        self.tokenizers[info.model] = tok
        self.folders[info.model] = target
        self.fingerprints[info.model] = sent
        self.max_model_len[info.model] = info.max_model_len
        log.info("tokenizer for %s fetched from %s", info.model, info.name)

    def _known(self, info: pb.WorkerInfo) -> str | None:
        """The model's fingerprint when its tokenizer is already here; ValueError when the worker's differs."""
        known = self.fingerprints.get(info.model)
        if known is not None and info.tokenizer_fingerprint != known:
            raise ValueError(
                f"worker {info.name} serves {info.model} with another tokenizer "
                f"({info.tokenizer_fingerprint[:12]!r} != {known[:12]})"
            )
        return known

    def _target(self, fingerprint: str) -> Path:
        """The cache folder of a fingerprint, checked to lie directly inside the cache."""
        root = self.folder.resolve()
        target = root / fingerprint
        if target.parent != root or os.path.normpath(target) != str(target):
            raise ValueError(f"tokenizer folder {target} would lie outside the cache {root}")
        return target

    def _install(self, fingerprint: str, files: dict[str, bytes]) -> tuple[Path, Tokenizer]:
        """Write, load and verify the files in a fresh folder, then move it to its place in the cache (or use the
        verified copy already there); the folder and its Tokenizer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._target(fingerprint)
        tmp = Path(tempfile.mkdtemp(prefix=".fetching-", dir=target.parent))
        try:
            for name, data in files.items():
                _write_new(tmp / name, data)
            tok = _load(tmp, fingerprint, "the worker's files")
            if _exists(target):
                cached = _cached(target, fingerprint)
                if cached is not None:
                    return target, cached
                _discard(target)
            try:
                os.rename(tmp, target)
            except OSError:  # another gateway sharing this cache put its copy there first
                cached = _cached(target, fingerprint) if _exists(target) else None
                if cached is None:
                    raise
                return target, cached
            return target, tok
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def get(self, model: str) -> Tokenizer | None:
        return self.tokenizers.get(model)


def _load(folder: Path, fingerprint: str, what: str) -> Tokenizer:
    """The Tokenizer in ``folder``, whose fingerprint must be ``fingerprint`` (ValueError otherwise)."""
    try:
        tok = Tokenizer.from_dir(folder)
        actual = tok.fingerprint
    except Exception as exc:  # ours are typed; the tokenizers library raises plain Exception on a bad tokenizer.json
        raise ValueError(f"{what} do not make a tokenizer: {exc}") from None
    if actual != fingerprint:
        raise ValueError(f"{what} have fingerprint {actual[:12]}, not the {fingerprint[:12]} the worker reported")
    return tok


def _cached(folder: Path, fingerprint: str) -> Tokenizer | None:
    """The Tokenizer of a cache folder when it holds exactly tokenizer files with that fingerprint, else None."""
    try:
        _check_entries(folder)
        return _load(folder, fingerprint, f"the files in {folder}")
    except ValueError as exc:
        log.warning("replacing a damaged tokenizer folder: %s", exc)
        return None


def _discard(folder: Path) -> None:
    """Remove a folder of the cache (a real folder, checked by the caller: rmtree never follows links)."""
    aside = Path(tempfile.mkdtemp(prefix=".stale-", dir=folder.parent))
    os.rename(folder, aside)  # an empty folder is replaced; the name is free for the new copy at once
    shutil.rmtree(aside, ignore_errors=True)
