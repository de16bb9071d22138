"""The committed gRPC stubs match fleet.proto, and the codec round-trips the engine's dataclasses."""

from pathlib import Path

from fleetserve.contract import RequestOutput, SamplingParams, TokenLogprob
from fleetserve.protocol import convert
from fleetserve.protocol.generate import PROTO, generate


def test_committed_stubs_match_the_proto(tmp_path):
    committed = PROTO.parent
    for fresh in generate(tmp_path):
        name = fresh.name
        assert (committed / name).read_text() == fresh.read_text(), (
            f"{name} is stale: run python -m fleetserve.protocol.generate and commit the result"
        )


def test_sampling_params_round_trip():
    p = SamplingParams(
        max_tokens=7,
        min_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.1,
        seed=2**40,
        stop_token_ids=[3, 4],
        ignore_eos=True,
        logprobs=3,
        speculative=False,
    )
    assert convert.sampling_from_proto(convert.sampling_to_proto(p)) == p
    q = SamplingParams()
    back = convert.sampling_from_proto(convert.sampling_to_proto(q))
    assert back == q and back.seed is None and back.logprobs is None


def test_output_chunk_round_trip():
    out = RequestOutput("r", [11], 1, 20, 16, None, [TokenLogprob(11, -0.5, [(11, -0.5), (9, -1.5)])], 1.0, 1.25, 1.3)
    chunk = convert.output_to_chunk(out, first=True, queue_s=0.1)
    assert list(chunk.token_ids) == [11] and chunk.finish_reason == "" and chunk.num_cached_tokens == 16
    assert abs(chunk.first_token_s - 0.25) < 1e-9
    lps = convert.logprobs_from_chunk(chunk)
    assert lps[0].token_id == 11 and [t for t, _ in lps[0].top] == [11, 9]
    assert Path(PROTO).exists()
