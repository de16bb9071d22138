"""The gateway's tokenizer store takes a worker's files only when they are well-formed and what the worker claims,
and never writes, renames or reads outside its cache folder."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetserve.gateway import tokenizers
from fleetserve.gateway.tokenizers import TokenizerStore
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.text.tokenizer import tokenizer_files


@pytest.fixture(scope="module")
def real_files(model_dir) -> dict[str, bytes]:
    """The default model's tokenizer files, as a worker sends them."""
    return tokenizer_files(model_dir)


@pytest.fixture(scope="module")
def real_fp(tokenizer) -> str:
    return tokenizer.fingerprint


def record(files: dict[str, bytes], fingerprint: str, registered: str | None = None, model: str = "m", name="w1"):
    """A stand-in for a WorkerRecord whose stub answers GetTokenizer with the given files."""
    calls = []

    async def get_tokenizer(request, timeout=None):
        calls.append(request)
        return pb.TokenizerFiles(model=model, files=files, fingerprint=fingerprint)

    info = pb.WorkerInfo(
        name=name,
        model=model,
        tokenizer_fingerprint=fingerprint if registered is None else registered,
        max_model_len=2048,
    )
    return SimpleNamespace(info=info, stub=SimpleNamespace(GetTokenizer=get_tokenizer), calls=calls)


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``root`` but ``skip``, with its kind, size and modification time (links not followed)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath, name))
            seen[str(Path(dirpath, name))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture
def cache(tmp_path) -> Path:
    """The store's cache folder (empty), with a decoy folder and file beside it that nothing may touch."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("untouched")
    (tmp_path / "etc").mkdir()
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


def register(store: TokenizerStore, rec) -> None:
    asyncio.run(store.on_register(rec))


def refused(cache: Path, rec, match: str) -> TokenizerStore:
    """Register ``rec``: it must raise ValueError matching ``match`` and leave everything outside the cache as it
    was, and the store without a tokenizer for the model."""
    outside = cache.parent.parent
    before = snapshot(outside, cache)
    store = TokenizerStore(cache)
    with pytest.raises(ValueError, match=match):
        register(store, rec)
    assert snapshot(outside, cache) == before
    assert store.get(rec.info.model) is None and rec.info.model not in store.folders
    return store


def test_a_valid_tokenizer_is_stored_under_its_fingerprint(cache, real_files, real_fp, tokenizer):
    store = TokenizerStore(cache)
    register(store, record(real_files, real_fp))
    assert store.folders["m"] == (cache / real_fp).resolve()
    assert store.fingerprints["m"] == real_fp
    assert store.get("m").encode("Hello world") == tokenizer.encode("Hello world")
    assert sorted(p.name for p in (cache / real_fp).iterdir()) == sorted(real_files)
    assert [p.name for p in cache.iterdir()] == [real_fp]  # no temporary folder left behind

    later = record({}, real_fp, name="w2")
    register(store, later)  # same tokenizer: accepted without fetching again
    assert later.calls == []
    with pytest.raises(ValueError, match="another tokenizer"):
        register(store, record(real_files, "f" * 64, name="w3"))

    again = TokenizerStore(cache)  # a restarted gateway finds the verified copy
    register(again, record(real_files, real_fp))
    assert again.get("m").fingerprint == real_fp


@pytest.mark.parametrize(
    "fingerprint",
    ["../../etc", "../outside", "/abs", "/etc/passwd", "ABC", "A" * 64, "a" * 63, "a" * 65, "", "a" * 63 + "/",
     "a" * 62 + "..", "\0" + "a" * 63, "g" * 64],
)  # fmt: skip
def test_a_malformed_fingerprint_is_refused(cache, real_files, fingerprint):
    refused(cache, record(real_files, fingerprint), "not a tokenizer fingerprint")
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "tokenizer.json/", "..\\x", "x\0", "model.safetensors"]
)
def test_a_file_with_a_bad_name_is_refused(cache, real_files, real_fp, name):
    refused(cache, record({**real_files, name: b"{}"}, real_fp), "does not accept")
    assert list(cache.iterdir()) == []


def test_oversized_files_are_refused(cache, real_files, real_fp):
    big = b" " * (tokenizers.MAX_FILE_BYTES["tokenizer.json"] + 1)
    refused(cache, record({**real_files, "tokenizer.json": big}, real_fp), "over the .*-byte limit")
    config = b" " * (tokenizers.DEFAULT_MAX_FILE_BYTES + 1)
    refused(cache, record({**real_files, "config.json": config}, real_fp), "over the .*-byte limit")
    each = tokenizers.DEFAULT_MAX_FILE_BYTES
    many = {n: b" " * each for n in ("config.json", "generation_config.json", "special_tokens_map.json")}
    many |= {"tokenizer.json": real_files["tokenizer.json"] + b" " * (tokenizers.MAX_TOTAL_BYTES - 3 * each)}
    refused(cache, record(many, real_fp), "in all, over the")


def test_files_that_do_not_match_their_fingerprint_are_refused(cache, real_files, real_fp):
    refused(cache, record(real_files, "0" * 64), "have fingerprint")
    refused(cache, record(real_files, real_fp, registered="1" * 64), "registered tokenizer")
    changed = {**real_files, "chat_template.jinja": b"{{ messages }}"}
    refused(cache, record(changed, real_fp), "have fingerprint")
    refused(cache, record({"tokenizer.json": b"not json"}, real_fp), "do not make a tokenizer")
    refused(cache, record({"config.json": b"{}"}, real_fp), "no tokenizer.json")
    assert [p.name for p in cache.iterdir()] == []  # temporary folders removed


def test_a_link_at_the_target_is_never_followed(cache, real_files, real_fp):
    victim = cache.parent / "outside"
    (cache / real_fp).symlink_to(victim, target_is_directory=True)
    refused(cache, record(real_files, real_fp), "not a folder")
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (cache / real_fp).is_symlink()

    (cache / real_fp).unlink()
    (cache / real_fp).symlink_to(cache.parent / "missing")  # a dangling link: nothing is created through it
    refused(cache, record(real_files, real_fp), "not a folder")
    assert not (cache.parent / "missing").exists()


def test_a_damaged_cached_copy_is_replaced_without_following_its_links(cache, real_files, real_fp, tokenizer):
    target = cache / real_fp
    target.mkdir()
    (target / "tokenizer.json").symlink_to(cache.parent / "outside" / "keep.txt")
    (target / "config.json").write_text("{}")
    outside = cache.parent.parent
    before = snapshot(outside, cache)
    store = TokenizerStore(cache)
    register(store, record(real_files, real_fp))
    assert snapshot(outside, cache) == before
    assert (cache.parent / "outside" / "keep.txt").read_text() == "untouched"
    assert not (target / "tokenizer.json").is_symlink()
    assert store.get("m").fingerprint == real_fp
    assert [p.name for p in cache.iterdir()] == [real_fp]


def test_a_worker_that_cannot_send_its_files_is_refused(cache, real_fp):
    import grpc

    class Broken(grpc.aio.AioRpcError):
        def __init__(self):
            super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    async def get_tokenizer(request, timeout=None):
        raise Broken()

    info = pb.WorkerInfo(name="w", model="m", tokenizer_fingerprint=real_fp)
    rec = SimpleNamespace(info=info, stub=SimpleNamespace(GetTokenizer=get_tokenizer))
    refused(cache, rec, "could not fetch the tokenizer")
