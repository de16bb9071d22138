"""Session fixtures: the default model converted once, its tokenizer, engines and transformers' reference answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Keep converted models inside the test session's cache unless the caller chose a cache folder.
os.environ.setdefault("FLEETSERVE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "fleetserve"))


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
_REFERENCE = pytest.StashKey["HfReference"]()


class HfReference:
    """transformers' answers to the chat prompts, computed by ``tests/hf_reference.py`` in a process of its own."""

    def __init__(self, prompts: list[list[int]], folder: Path):
        self.prompts = prompts
        self.folder = folder
        self.response = folder / "response.json"
        self.log = folder / "output.log"
        request = folder / "request.json"
        request.write_text(json.dumps({"prompts": prompts, "new_tokens": REFERENCE_TOKENS}))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "tests.hf_reference", str(request), str(self.response)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def result(self, timeout: float = 600) -> dict:
        """The answers: ``greedy`` (one list of ids per prompt) and ``first_logits`` (after the first prompt)."""
        code = self.process.wait(timeout)
        assert code == 0, f"tests/hf_reference.py exited with {code}:\n{self.log.read_text()[-3000:]}"
        return {**json.loads(self.response.read_text()), "prompts": self.prompts, "new_tokens": REFERENCE_TOKENS}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _start_reference(config: pytest.Config) -> HfReference:
    if _REFERENCE not in config.stash:
        from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir
        from fleetserve.text.tokenizer import Tokenizer
        from tests.helpers import PROMPTS

        tok = Tokenizer.from_dir(prepare_model_dir(DEFAULT_MODEL, progress=False))
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        folder = Path(tempfile.mkdtemp(prefix="fleetserve-hf-reference-"))
        config.stash[_REFERENCE] = HfReference(prompts, folder)
    return config.stash[_REFERENCE]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start transformers on the reference answers now when a test will want them (they take half a minute)."""
    if any("hf_reference" in getattr(item, "fixturenames", ()) for item in items):
        _start_reference(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _REFERENCE in config.stash:
        config.stash[_REFERENCE].stop()


@pytest.fixture(scope="session")
def hf_reference(pytestconfig) -> dict:
    """transformers' greedy continuations of the chat prompts (REFERENCE_TOKENS each, EOS masked) and its
    next-token logits after the first, from the GGUF file through its own de-quantizer, in float32."""
    return _start_reference(pytestconfig).result()
