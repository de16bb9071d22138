"""Embeddings through a real fleet: a gateway with an LLM worker and an embedding worker (its dynamic batcher), used
through the official openai client, plain HTTP and the CLI."""

import base64
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.fleet import READY_WORKER, start_fleet

pytestmark = pytest.mark.slow

LLM = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
KEY = "embed-key"
DELAY_MS = 40
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The quarterly report shows revenue grew by 12% while costs fell, " * 4,
    "ok",
    "Paris is the capital of France; Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
def embed_dir():
    from fleetserve.model_files import prepare_model_dir

    return prepare_model_dir(EMBED, progress=False)


@pytest.fixture(scope="module")
def fleet(model_dir, embed_dir):
    f = start_fleet(1, KEY, 3.0, "--preprocess-workers", "1", "--response-cache", "memory")
    try:
        proc, _ = f.add_worker(
            "embedder", "--model", EMBED, "--max-batch-size", "8", "--max-queue-delay-ms", str(DELAY_MS),
            "--no-adaptive-queue-delay", "--metrics-port", "0",  # a fixed delay: a lone input always waits it
        )  # fmt: skip
        f.wait_workers(2)
        f.embed_metrics = re.search(r"metrics (http://\S+/metrics)", proc.wait_for(READY_WORKER).string).group(1)
    except BaseException:
        f.stop()
        raise
    yield f
    f.stop()


@pytest.fixture(scope="module")
def client(fleet):
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def embed_tok(embed_dir):
    from fleetserve.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(embed_dir)


@pytest.fixture(scope="module")
def local(embed_dir, embed_tok):
    """The same model in this process: what the fleet's vectors must equal."""
    from fleetserve.engine.embedder import Embedder

    embedder = Embedder.load(embed_dir)
    return lambda texts: embedder.embed(embed_tok.encode_inputs(texts)).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _post(fleet, body: dict, path: str = "/v1/embeddings", **headers) -> httpx.Response:
    return httpx.post(fleet.url + path, json=body, headers={**fleet.headers, **headers}, timeout=60)


def _metric(url: str, name: str) -> float:
    answer = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 200
    text = answer.text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))  # fmt: skip


def test_models_say_their_kind(client):
    models = {m.id: m.model_extra["fleetserve"] for m in client.models.list().data}
    assert models[EMBED]["kind"] == "embed" and models[EMBED]["dimensions"] == 384
    assert models[EMBED]["context_length"] == 256
    assert models[LLM]["kind"] == "generate"


def test_one_and_many_inputs_equal_the_model_in_process(client, local, embed_tok):
    one = client.embeddings.create(model=EMBED, input=SENTENCES[0])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(embed_tok.encode_inputs(SENTENCES[:1])[0])
    many = client.embeddings.create(model=EMBED, input=SENTENCES)
    assert [d.index for d in many.data] == list(range(len(SENTENCES)))
    got = np.array([d.embedding for d in many.data], dtype=np.float32)
    assert _cosines(got, local(SENTENCES)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert np.allclose(got[0], np.array(one.data[0].embedding), atol=1e-5)  # alone or batched: the same vector


def test_base64_and_token_ids(client, fleet, embed_tok):
    floats = client.embeddings.create(model=EMBED, input=SENTENCES[:3])
    packed = client.embeddings.create(model=EMBED, input=SENTENCES[:3], encoding_format="base64")
    for f, p in zip(floats.data, packed.data):  # asked for base64, the client hands the string over as is
        assert np.allclose(f.embedding, np.frombuffer(base64.b64decode(p.embedding), dtype="<f4"), atol=1e-6)
    raw = _post(fleet, {"model": EMBED, "input": SENTENCES[:1], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, floats.data[0].embedding, atol=1e-6)
    ids = embed_tok.encode_inputs(SENTENCES[:2])
    by_ids = client.embeddings.create(model=EMBED, input=ids)
    assert np.allclose(by_ids.data[1].embedding, floats.data[1].embedding, atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_bad_input_is_a_400_naming_it(client, fleet):
    cases = [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": ["word " * 300]}, "input[0]"),  # over the model's 256 tokens: refused, not cut
        ({"input": [[101, 99999, 102]]}, "input[0]"),
        ({"input": "hi", "dimensions": 100}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [["a"], 3]}, "input[0]"),
    ]
    for extra, param in cases:
        r = _post(fleet, {"model": EMBED, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())
    assert _post(fleet, {"model": EMBED, "input": "hi", "dimensions": 384}).status_code == 200
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBED, input="")
    assert _post(fleet, {"model": "nope", "input": "hi"}).status_code == 404
    wrong = httpx.post(fleet.url + "/v1/embeddings", json={"model": EMBED, "input": "hi"},
                       headers={"Authorization": "Bearer wrong"}, timeout=60)  # fmt: skip
    assert wrong.status_code == 401


def test_a_model_on_the_wrong_route_is_told_the_right_one(client):
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "/v1/embeddings" in chat.value.message
    with pytest.raises(openai.BadRequestError) as embed:
        client.embeddings.create(model=LLM, input="hi")
    assert "/v1/chat/completions" in embed.value.message
    answer = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content  # the LLM beside it serves on


def test_concurrent_requests_share_batches_and_get_their_own_vectors(fleet, client, local):
    batches_before = _metric(fleet.embed_metrics, "fleetserve_embed_batch_size_count")
    inputs_before = _metric(fleet.embed_metrics, "fleetserve_embed_batch_size_sum")
    texts = [[f"request {i}: {s}"] for i, s in enumerate(SENTENCES * 2)]

    def ask(text):
        return client.embeddings.create(model=EMBED, input=text, extra_headers={"Cache-Control": "no-cache"})

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(ask, texts))
    got = np.array([a.data[0].embedding for a in answers], dtype=np.float32)
    assert _cosines(got, local([t[0] for t in texts])).min() >= 0.9999
    batches = _metric(fleet.embed_metrics, "fleetserve_embed_batch_size_count") - batches_before
    inputs = _metric(fleet.embed_metrics, "fleetserve_embed_batch_size_sum") - inputs_before
    assert inputs == len(texts) and batches < len(texts)  # requests that arrived together ran together
    assert _metric(fleet.embed_metrics, "fleetserve_embed_padded_tokens_total") >= _metric(
        fleet.embed_metrics, "fleetserve_embed_tokens_total"
    )


def test_a_lone_input_waits_out_the_delay_and_a_full_batch_does_not(fleet):
    body = {"model": EMBED, "input": "a lone sentence, never seen before"}
    start = time.monotonic()
    assert _post(fleet, body, **{"cache-control": "no-cache"}).status_code == 200
    assert time.monotonic() - start >= DELAY_MS / 1000 * 0.9  # it waited for company that never came
    full = {"model": EMBED, "input": [f"sentence number {i}" for i in range(8)]}  # a full batch runs at once
    start = time.monotonic()
    assert _post(fleet, full, **{"cache-control": "no-cache"}).status_code == 200
    assert time.monotonic() - start < 30  # generous: the batch did not hang waiting


def test_repeated_inputs_come_from_the_response_cache(fleet):
    hits = _metric(fleet.url + "/metrics", "fleetserve_response_cache_hits_total")
    body = {"model": EMBED, "input": ["cache me once", "and me too"]}
    first = _post(fleet, body).json()
    second = _post(fleet, body).json()
    assert second["data"] == first["data"]
    assert _metric(fleet.url + "/metrics", "fleetserve_response_cache_hits_total") - hits == 2


def test_the_cli_prints_vectors_and_similarities(fleet):
    env_key = ["--api-key", KEY]
    out = subprocess.run(
        [sys.executable, "-m", "fleetserve", "embed", "--url", fleet.url, *env_key, "--similarity",
         "A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines()[1:4]]
    matrix = np.array([[float(v) for v in row[1:]] for row in rows])
    assert np.allclose(np.diag(matrix), 1.0, atol=1e-3) and matrix[0, 1] > matrix[0, 2]
    local = subprocess.run(
        [sys.executable, "-m", "fleetserve", "embed", "--threads", "1", "A man is eating food."],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    remote = subprocess.run(
        [sys.executable, "-m", "fleetserve", "embed", "--url", fleet.url, *env_key, "A man is eating food."],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    a, b = np.array(json.loads(local)), np.array(json.loads(remote))  # one JSON array per text
    assert a.shape == (384,) and float(a @ b) >= 0.9999
