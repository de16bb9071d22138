"""StopStringMatcher: stop strings found across arbitrary chunkings, never partly emitted."""

from __future__ import annotations

import random

import pytest

from fleetserve.text.stop import StopStringMatcher


def expected(text: str, stops: list[str], include_stop: bool = False) -> tuple[str, bool]:
    """Oracle: cut at the earliest-starting occurrence (shortest stop on a tie)."""
    hits = [(text.find(s), len(s)) for s in stops if s in text]
    if not hits:
        return text, False
    start, length = min(hits)
    return text[: start + length] if include_stop else text[:start], True


def run(chunks: list[str], stops: list[str], include_stop: bool = False) -> tuple[str, bool, list[str]]:
    """Feed every chunk, flush, and return (joined output, stopped, per-call outputs)."""
    matcher = StopStringMatcher(stops, include_stop=include_stop)
    outputs = []
    stopped = False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        outputs.append(out)
    if not stopped:
        outputs.append(matcher.flush())
        stopped = matcher.stopped
    return "".join(outputs), stopped, outputs


def random_chunks(rng: random.Random, text: str) -> list[str]:
    """Split ``text`` at random points (empty chunks included now and then)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_single_chunk_cut_before_stop():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello STOP world") == ("hello ", True)
    assert matcher.stopped and matcher.matched == "STOP"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_include_stop():
    matcher = StopStringMatcher(["STOP"], include_stop=True)
    assert matcher.feed("hello STOP world") == ("hello STOP", True)


def test_stop_split_across_chunks_is_never_emitted():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("abc</") == ("abc", False)
    assert matcher.held == "</"
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d> tail") == ("", True)


def test_false_start_is_released():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("a</e") == ("a", False)
    assert matcher.feed("x") == ("</ex", False)
    assert matcher.feed("</") == ("", False)
    assert matcher.flush() == "</"
    assert not matcher.stopped


def test_no_stops_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_earliest_start_wins_over_earliest_end():
    # "b" completes first, but "xbc" starts earlier: the cut is at "x".
    assert run(["x", "b", "c", "d"], ["xbc", "b"])[:2] == ("", True)
    # If "xbc" never completes, "b" is the stop, even when that is only known at flush.
    assert run(["x", "b"], ["xbc", "b"])[:2] == ("x", True)
    assert run(["x", "b", "z"], ["xbc", "b"])[:2] == ("x", True)


def test_tie_goes_to_the_shortest_stop():
    assert run(["a\n", "\nb"], ["\n\n", "\n"], include_stop=True)[:2] == ("a\n", True)


def test_empty_stop_is_a_caller_bug():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_feed_after_flush_is_an_error():
    matcher = StopStringMatcher(["x"])
    matcher.flush()
    with pytest.raises(RuntimeError):
        matcher.feed("a")


@pytest.mark.parametrize("include_stop", [False, True])
def test_random_chunkings_match_one_shot(include_stop: bool):
    rng = random.Random(1234 + include_stop)
    alphabet = "ab\n<>"
    for _ in range(1500):
        stops = sorted(
            {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))}
        )
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        want = expected(text, stops, include_stop)
        whole = run([text], stops, include_stop)[:2]
        assert whole == want, (text, stops)
        chunks = random_chunks(rng, text)
        got, stopped, outputs = run(chunks, stops, include_stop)
        assert (got, stopped) == want, (chunks, stops)
        if not include_stop:
            # no emitted prefix ever contains the start of the stop that ends the text
            emitted = ""
            for out in outputs:
                emitted += out
                assert want[0].startswith(emitted)


def test_random_chunkings_realistic_text():
    rng = random.Random(7)
    text = "The answer is 42.\n\nUser: and then?\nAssistant: done</s> trailing words"
    for stops in (["User:"], ["\n\n"], ["</s>", "User:"], ["Assistant:", "then"], ["nowhere"]):
        for _ in range(200):
            chunks = random_chunks(rng, text)
            assert run(chunks, stops)[:2] == expected(text, stops)


def test_a_chunk_of_several_tokens_ends_its_tokens_where_a_stop_ends_its_text(tokenizer):
    from fleetserve.gateway.generation import chunk_text
    from fleetserve.text.detokenizer import IncrementalDetokenizer

    ids = tokenizer.encode("The tide came in. STOP and then the boats went out again.")
    stop_at = next(i for i in range(1, len(ids) + 1) if "STOP" in tokenizer.decode(ids[:i]))
    text, stopped, used = chunk_text(IncrementalDetokenizer(tokenizer, []), StopStringMatcher(["STOP"]), ids, False)
    assert (text, stopped, used) == ("The tide came in. ", True, stop_at) and used < len(ids)
    # one token per chunk gives the same text; without stops a chunk takes all its tokens
    detok, matcher, pieces = IncrementalDetokenizer(tokenizer, []), StopStringMatcher(["STOP"]), []
    for token in ids[:stop_at]:
        pieces.append(chunk_text(detok, matcher, [token], False)[0])
    assert "".join(pieces) == text and matcher.stopped
    whole = chunk_text(IncrementalDetokenizer(tokenizer, []), None, ids, True)
    assert whole == (tokenizer.decode(ids), False, len(ids))
