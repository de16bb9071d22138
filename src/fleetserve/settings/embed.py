"""`fleetserve embed`'s settings: the embedding model (or a gateway's URL) and how to print the vectors."""

from __future__ import annotations

from typing import ClassVar

from fleetserve.settings.base import Settings, option


class EmbedSettings(Settings):
    """Everything `fleetserve embed` is told besides the texts."""

    command: ClassVar[str] = "embed"

    model: str = option("all-minilm-l6-v2", "the embedding model: a name or a sentence-transformers folder")
    similarity: bool = option(
        False, "print the cosine similarity of every pair of texts (a matrix) instead of the vectors"
    )
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    url: str | None = option(None, "a gateway's URL: embed there instead of in this process")
    api_key: str | None = option(None, "bearer key for --url", secret=True)
