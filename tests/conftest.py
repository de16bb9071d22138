"""Session fixtures: the default model converted once, its tokenizer, engines and the transformers reference."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own model, loaded straight from the GGUF file (its de-quantizer, not ours)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fleetserve.model_files import DEFAULT_MODEL, KNOWN_MODELS

    path = KNOWN_MODELS[DEFAULT_MODEL].path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()
