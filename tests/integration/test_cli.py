"""The fleetserve command as a user runs it: a real process."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow


def fleetserve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def test_generate_streams_text(model_dir):
    r = fleetserve("generate", "What is the capital of France? Answer in one word.", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "finish: stop" in r.stderr  # the model ends its short answer itself


def test_generate_seeded_sampling_repeats(model_dir):
    args = ("generate", "Tell me a story.", "--max-tokens", "12", "--temperature", "1.0", "--seed", "7", "--quiet")
    args += ("--threads", "1")  # one core each
    with ThreadPoolExecutor(2) as pool:  # two separate processes, side by side
        a, b = pool.map(lambda _: fleetserve(*args), range(2))
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_models_lists_the_default():
    r = fleetserve("models", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["installed"] == "yes"


def test_errors_are_clear():
    r = fleetserve("generate", "hi", "--model", "nope")
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
    r = fleetserve("generate", "hi", "--temperature", "-1")
    assert r.returncode == 2 and "temperature must be a finite number >= 0" in r.stderr
