"""`fleetserve embed`: texts to vectors from the terminal, with an in-process embedding model or a gateway's.

Each text's vector is printed as one JSON array per line; ``--similarity`` prints the cosine similarity of every
pair instead, as a matrix with the texts' numbers.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from array import array

from fleetserve.errors import InvalidRequestError
from fleetserve.settings.embed import EmbedSettings


def run_embed(s: EmbedSettings, texts: list[str]) -> int:
    """Embed ``texts`` ('-' reads one text per line of standard input) and print vectors or similarities."""
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts or any(not t for t in texts):
        raise InvalidRequestError("give one or more non-empty texts to embed", "texts")
    vectors = _remote(s, texts) if s.url else _local(s, texts)
    if s.similarity:
        _print_similarities(texts, vectors)
    else:
        for vector in vectors:
            print(json.dumps([round(v, 7) for v in vector]))
    return 0


def _local(s: EmbedSettings, texts: list[str]) -> list[list[float]]:
    """The vectors from the model loaded in this process."""
    from fleetserve.model_files import model_kind, prepare_model_dir

    model_dir = prepare_model_dir(s.model, progress=sys.stderr.isatty())
    if model_kind(model_dir) != "embed":
        raise InvalidRequestError(f"{s.model} is not an embedding model: `fleetserve generate` runs it", "model")
    import torch

    from fleetserve.engine.embedder import Embedder
    from fleetserve.text.tokenizer import Tokenizer

    if s.threads:
        torch.set_num_threads(s.threads)
    embedder = Embedder.load(model_dir)
    inputs = Tokenizer.from_dir(model_dir).encode_inputs(texts)
    for i, ids in enumerate(inputs):
        if len(ids) > embedder.max_input_tokens:
            raise InvalidRequestError(
                f"text {i + 1} has {len(ids)} tokens; the model takes at most {embedder.max_input_tokens}", "texts"
            )
    return embedder.embed(inputs).tolist()


def _remote(s: EmbedSettings, texts: list[str]) -> list[list[float]]:
    """The vectors from a gateway's /v1/embeddings (base64, the compact form)."""
    import urllib.error
    import urllib.request

    from fleetserve.generate import gateway_failure

    headers = {"Content-Type": "application/json"}
    if s.api_key:
        headers["Authorization"] = f"Bearer {s.api_key}"
    body = json.dumps({"model": s.model, "input": texts, "encoding_format": "base64"}).encode()
    request = urllib.request.Request(s.url.rstrip("/") + "/v1/embeddings", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            answer = json.loads(resp.read())
    except urllib.error.URLError as exc:  # HTTPError included
        raise gateway_failure(exc, s.url) from None
    vectors = []
    for item in sorted(answer["data"], key=lambda d: d["index"]):
        values = array("f")
        values.frombytes(base64.b64decode(item["embedding"]))
        if sys.byteorder == "big":
            values.byteswap()
        vectors.append(values.tolist())
    return vectors


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


def _print_similarities(texts: list[str], vectors: list[list[float]]) -> None:
    """The cosine matrix, each row and column numbered, with the numbered texts below."""
    n = len(vectors)
    print("      " + "".join(f"{j + 1:>8}" for j in range(n)))
    for i in range(n):
        print(f"{i + 1:>6}" + "".join(f"{cosine(vectors[i], vectors[j]):8.4f}" for j in range(n)))
    for i, text in enumerate(texts):
        shown = text if len(text) <= 70 else text[:67] + "..."
        print(f"  {i + 1}: {shown}")
