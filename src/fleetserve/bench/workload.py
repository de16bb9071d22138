"""Benchmark workloads: where the prompt files live, reading them, and shaping the prompts a run sends."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_DIR = REPO_ROOT / "benchmarks" / "data"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_MODEL = "smollm2-135m-instruct"

WARM_UP_TEXT = "Hello! How are you today?"
"""Plain text (not a chat), so that warming up leaves no chat-template prefix in the prefix cache."""


def load_prompts(path: str | Path) -> list[list[dict]]:
    """The ``messages`` of every line of a JSONL prompts file, in file order."""
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"{path}:{number}: expected an object with a 'messages' list")
            prompts.append(record["messages"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def take(items: Sequence[Any], n: int) -> list[Any]:
    """The first n items, cycling through ``items`` again when n is larger."""
    return [items[i % len(items)] for i in range(n)]


def salted(messages: list[dict], tag: str | None) -> list[dict]:
    """``messages`` with ``[tag] `` in front of the first message's text (unchanged when tag is None)."""
    if tag is None or not messages or not isinstance(messages[0].get("content"), str):
        return messages
    first = dict(messages[0])
    first["content"] = f"[{tag}] {first['content']}"
    return [first, *messages[1:]]


def salts(count: int, enabled: bool) -> list[str | None]:
    """``count`` distinct random 4-digit tags (short, so they add few prompt tokens), or Nones when disabled."""
    if not enabled:
        return [None] * count
    return [str(n) for n in secrets.SystemRandom().sample(range(1000, 10000), count)]
