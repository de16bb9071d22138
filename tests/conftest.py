"""Session fixtures: the default model converted once, its tokenizer, engines and transformers' reference answers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Keep converted models inside the test session's cache unless the caller chose a cache folder.
os.environ.setdefault("FLEETSERVE_CACHE", str(ROOT / ".cache" / "fleetserve"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir

    return prepare_model_dir(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from fleetserve.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def chat_prompts(tokenizer) -> list[list[int]]:
    from tests.helpers import PROMPTS

    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="session")
def make_engine(model_dir):
    """Factory of engines on the default model (each ~2 s to build); options as in tests.helpers.engine_config."""
    from fleetserve.engine.engine import LLMEngine
    from tests.helpers import engine_config

    def build(**options):
        return LLMEngine(engine_config(**options), progress=False)

    return build


@pytest.fixture(scope="session")
def engine(make_engine):
    """A shared engine with default settings; tests must leave it with no unfinished request."""
    eng = make_engine()
    yield eng
    assert not eng.has_unfinished()


REFERENCE_TOKENS = 24
"""How many tokens transformers generates for each chat prompt in the reference answers."""
_HELPERS = pytest.StashKey[dict]()


HELPER_NICENESS = 10
"""Helpers run below the tests' priority: they take the CPU time the tests leave idle."""


class Helper:
    """A process the session starts as soon as it knows it will be needed (``python -m MODULE ARGS``), its
    output in a log file, so that its work overlaps the tests before the ones that wait for it. With ``after``,
    it starts once that helper has finished (one helper at a time leaves the tests a core)."""

    def __init__(
        self, module: str, args: list[str], folder: Path, env: dict[str, str] | None = None, after: Helper | None = None
    ):
        self.module = module
        self.folder = folder
        self.log = folder / "output.log"
        self.command = ["nice", "-n", str(HELPER_NICENESS), sys.executable, "-m", module, *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._launched = threading.Event()
        if after is None:
            self._launch()
        else:
            threading.Thread(target=self._launch_after, args=(after,), daemon=True).start()

    def _launch_after(self, before: Helper) -> None:
        with contextlib.suppress(Exception):
            before.wait()
        self._launch()

    def _launch(self) -> None:
        with self._lock:
            if not self._stopped:
                with self.log.open("w") as log:
                    self.process = subprocess.Popen(
                        self.command,
                        cwd=ROOT,
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
            self._launched.set()

    def wait(self, timeout: float = 900) -> int | None:
        assert self._launched.wait(timeout), f"{self.module} did not start"
        return self.process.wait(timeout) if self.process is not None else None

    def failure(self) -> str:
        code = self.process.returncode if self.process is not None else None
        return f"{self.module} exited with {code}:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _helpers(config: pytest.Config) -> dict[str, Helper]:
    if _HELPERS not in config.stash:
        config.stash[_HELPERS] = {}
    return config.stash[_HELPERS]


def _chat_prompt_ids() -> list[list[int]]:
    from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir
    from fleetserve.text.tokenizer import Tokenizer
    from tests.helpers import PROMPTS

    tok = Tokenizer.from_dir(prepare_model_dir(DEFAULT_MODEL, progress=False))
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def _start_reference(config: pytest.Config) -> Helper:
    """transformers' answers to the chat prompts (``tests/hf_reference.py``), on one thread."""
    helpers = _helpers(config)
    if "reference" not in helpers:
        folder = Path(tempfile.mkdtemp(prefix="fleetserve-hf-reference-"))
        request = {"prompts": _chat_prompt_ids(), "new_tokens": REFERENCE_TOKENS}
        (folder / "request.json").write_text(json.dumps(request))
        args = [str(folder / "request.json"), str(folder / "response.json")]
        after = helpers.get("compile")  # needed sooner: the reference waits for it
        helpers["reference"] = Helper("tests.hf_reference", args, folder, {"OMP_NUM_THREADS": "1"}, after)
    return helpers["reference"]


def _start_compile_warmup(config: pytest.Config) -> Helper:
    """The compiled-decode tests' graphs built into the inductor cache ahead of them (``tests/warm_compile.py``)."""
    helpers = _helpers(config)
    if "compile" not in helpers:
        from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir

        prepare_model_dir(DEFAULT_MODEL, progress=False)  # converted once, here, not by two processes at once
        helpers["compile"] = Helper("tests.warm_compile", [], Path(tempfile.mkdtemp(prefix="fleetserve-warm-")))
    return helpers["compile"]


def _waits_for_a_helper(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("compiles")) or "hf_reference" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the helpers the selected tests will wait for, now (each takes most of a minute of CPU), and run the
    modules that wait for them last, so that the helpers' work fills the cores the other tests leave idle
    instead of being waited for."""
    if any(item.get_closest_marker("compiles") for item in items):
        _start_compile_warmup(config)
    if any("hf_reference" in getattr(item, "fixturenames", ()) for item in items):
        _start_reference(config)
    waiting = {item.module for item in items if _waits_for_a_helper(item)}
    items[:] = [i for i in items if i.module not in waiting] + [i for i in items if i.module in waiting]


def pytest_unconfigure(config: pytest.Config) -> None:
    for helper in _helpers(config).values():
        helper.stop()


@pytest.fixture(scope="session")
def hf_reference(pytestconfig) -> dict:
    """transformers' greedy continuations of the chat prompts (REFERENCE_TOKENS each, EOS masked) and its
    next-token logits after the first, from the GGUF file through its own de-quantizer, in float32."""
    helper = _start_reference(pytestconfig)
    assert helper.wait() == 0, helper.failure()
    request = json.loads((helper.folder / "request.json").read_text())
    return {**json.loads((helper.folder / "response.json").read_text()), **request}


@pytest.fixture(scope="session")
def compile_warmed(pytestconfig) -> None:
    """Wait for the inductor cache to hold the compiled-decode tests' graphs (a failed warm-up only costs time:
    the tests compile whatever is missing themselves)."""
    _start_compile_warmup(pytestconfig).wait()


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of the module's own on a free loopback port, without persistence (skipped without one)."""
    try:
        import redis
    except ImportError:
        pytest.skip("the redis package is not installed (pip install redis)")
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    from fleetserve.bench.local_fleet import free_port

    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
