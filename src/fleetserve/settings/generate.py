"""`fleetserve generate`'s settings: an engine (or a gateway's URL) and how to sample one answer."""

from __future__ import annotations

from typing import ClassVar

from fleetserve.settings.base import option
from fleetserve.settings.engine import EngineSettings


class GenerateSettings(EngineSettings):
    """Everything `fleetserve generate` is told besides the prompt."""

    command: ClassVar[str] = "generate"

    compile: bool = option(
        False,
        "compile decode steps in the background while generating (pays for long outputs; one short answer is "
        "done before the first graph is built)",
    )
    max_tokens: int = option(256, "most tokens to generate")
    temperature: float = option(0.0, "0 is greedy")
    top_p: float = option(1.0, "nucleus sampling mass")
    top_k: int = option(0, "sample among the k most likely tokens; 0: all")
    seed: int | None = option(None, "seed for reproducible sampling")
    system: str | None = option(None, "a system message to put before the prompt")
    raw: bool = option(False, "complete the prompt as plain text, without the chat template")
    ignore_eos: bool = option(False, "keep generating past the end-of-sequence token")
    quiet: bool = option(False, "print only the generated text")
    url: str | None = option(None, "a gateway's URL: generate there instead of in this process")
    api_key: str | None = option(None, "bearer key for --url", secret=True)
