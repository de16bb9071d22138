"""The sentence embedder against transformers' BertModel + mean pooling + L2 normalisation, on all-MiniLM-L6-v2."""

from __future__ import annotations

import random

import pytest
import torch

from fleetserve.engine.embedder import Embedder
from fleetserve.errors import InvalidRequestError
from fleetserve.model_files import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, catalog, model_kind, prepare_model_dir

LONG = (
    "In the early hours of 14 March 2023, after nearly three weeks of heavy rain, the river that runs through the "
    "old town rose by more than 4.5 metres, flooding 1,200 homes, two schools and the 19th-century market hall; "
    "volunteers (many of them students from the nearby university) worked through the night to fill sandbags, "
    "move elderly residents to the sports centre on Hill Road, and rescue animals from the farms downstream. "
    "By Thursday morning the water had begun to fall, but engineers warned that the embankment, built in 1962 and "
    "last repaired in 1998, might not survive another storm of the same strength, and the council announced an "
    "emergency budget of 3.2 million euros to rebuild it before winter. Residents, however, asked why the warnings "
    "issued years earlier had been ignored, and whether the new plans would protect the lower streets as well. "
    "A public meeting is planned for Monday, 20 March, at 7 p.m. in the town hall; everyone is welcome to attend."
)

SENTENCES = [
    "Hello!",
    "The cat sat on the mat.",
    "A man is playing a guitar on the street corner.",
    "What time does the train to Edinburgh leave?",
    "I can't believe it's already December, can you?",
    "Prices rose by 3.7% in the second quarter of 2024.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantum computers use qubits, which can exist in superpositions of states.",
    "Please send the report to the team by Friday at 5 p.m.",
    "She sells sea-shells by the sea-shore.",
    "Why?",
    "Machine learning models need large, diverse and carefully labelled datasets.",
    "The Eiffel Tower is 330 metres tall and was finished in 1889.",
    'He said: "Don\'t touch that button -- it launches the rockets!"',
    "Coffee or tea? Both, thank you.",
    "My phone number is 555-0199; call me after 8.",
    "The committee postponed its decision until further evidence could be gathered from the regional offices.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Ok",
    "A heavy storm knocked down trees and power lines across the county overnight.",
    "The recipe calls for 2 cups of flour, 1/2 teaspoon of salt and 3 eggs.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Dogs are loyal companions; cats are independent.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Error 404: the page you requested could not be found.",
    "Running every morning improved his mood, his sleep and his blood pressure.",
    "Is this the real life? Is this just fantasy?",
    "The children built a sandcastle with towers, a moat and a tiny flag.",
    "Volcanic eruptions can cool the global climate for a year or two.",
    "Thank you so much for your help yesterday - it made all the difference.",
    "Mount Everest, at 8,849 m, is the highest mountain above sea level.",
    LONG,
]


@pytest.fixture(scope="module")
def embed_dir():
    return prepare_model_dir(DEFAULT_EMBEDDING_MODEL, progress=False)


@pytest.fixture(scope="module")
def embedder(embed_dir) -> Embedder:
    return Embedder.load(embed_dir)


@pytest.fixture(scope="module")
def inputs(embed_dir) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(embed_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return [tok.encode(s, add_special_tokens=True).ids for s in SENTENCES]


@pytest.fixture(scope="module")
def reference(embed_dir, inputs) -> torch.Tensor:
    """transformers' vectors, each sentence run alone: mean over the attention mask, then L2 normalised."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(embed_dir, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for ids in inputs:
            x = torch.tensor([ids])
            mask = torch.ones_like(x)
            hidden = model(input_ids=x, attention_mask=mask).last_hidden_state
            weights = mask[..., None].float()
            rows.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.nn.functional.normalize(torch.cat(rows), dim=1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a, b, dim=1).tolist()


def test_inputs_cover_short_long_and_mixed(inputs):
    lengths = [len(ids) for ids in inputs]
    assert min(lengths) <= 4 and 150 <= max(lengths) <= 256
    assert len(set(lengths)) >= 12


def test_the_folder_describes_the_model(embedder):
    assert embedder.architecture == "BertModel"
    assert embedder.dimensions == 384
    assert embedder.max_input_tokens == 256
    assert embedder.pad_token_id == 0
    assert (embedder.pooling, embedder.normalize) == ("mean", True)


def test_each_input_alone_matches_transformers(embedder, inputs, reference):
    ours = torch.cat([embedder.embed([ids]) for ids in inputs])
    assert ours.dtype == torch.float32 and ours.shape == (len(inputs), 384)
    assert min(cosines(ours, reference)) >= 0.9999


def test_one_mixed_batch_matches_transformers(embedder, inputs, reference):
    ours = embedder.embed(inputs)
    assert ours.shape == (len(inputs), 384)
    assert min(cosines(ours, reference)) >= 0.9999
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(inputs)), atol=1e-5, rtol=0)


def test_a_shuffled_batch_gives_each_input_the_same_vector(embedder, inputs, reference):
    order = list(range(len(inputs)))
    random.Random(7).shuffle(order)
    ours = embedder.embed([inputs[i] for i in order])
    assert min(cosines(ours, reference[order])) >= 0.9999
    torch.testing.assert_close(ours, embedder.embed(inputs)[order], atol=1e-5, rtol=0)


def test_batches_of_similar_lengths_run_padded_and_match_transformers(embedder, inputs, reference):
    from fleetserve.engine.models.bert import PACK_BELOW

    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    padded = 0
    for start in range(0, len(order), 4):  # neighbours in length: little padding, so most run padded
        group = order[start : start + 4]
        lengths = [len(inputs[i]) for i in group]
        padded += len(set(lengths)) > 1 and sum(lengths) >= PACK_BELOW * len(lengths) * max(lengths)
        got = embedder.embed([inputs[i] for i in group])
        assert min(cosines(got, reference[group])) >= 0.9999
    assert padded >= 3  # the padded path (an attention mask, no packing) was taken


def test_bad_inputs_are_refused_naming_the_input(embedder, inputs):
    too_long = [101] + [1996] * 255 + [102]
    for bad, words in (
        ([], "empty"),
        (too_long, "257 tokens"),
        ([101, 30522, 102], "30522"),
        ([101, -1, 102], "-1"),
    ):
        with pytest.raises(InvalidRequestError, match=rf"input 2 .*{words}") as err:
            embedder.embed([inputs[0], inputs[1], bad])
        assert err.value.param == "input"
    assert embedder.embed([too_long[:256]]).shape == (1, 384)  # exactly the limit is fine


def test_the_unpacked_folder_is_reused(embed_dir, monkeypatch):
    def unpack_again(*args, **kwargs):
        raise AssertionError("the zip was unpacked again")

    monkeypatch.setattr(catalog, "unpack_zip", unpack_again)
    assert prepare_model_dir(DEFAULT_EMBEDDING_MODEL, progress=False) == embed_dir
    assert (embed_dir / "model.safetensors").is_file() and (embed_dir / "1_Pooling" / "config.json").is_file()


def test_model_kind(embed_dir):
    assert model_kind(embed_dir) == "embed"
    assert model_kind(prepare_model_dir(DEFAULT_MODEL, progress=False)) == "generate"
