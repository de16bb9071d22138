"""NgramProposer: which earlier occurrence of the context's suffix it copies from, and how much."""

from fleetserve.engine.ngram import NgramProposer


def test_longest_match_wins_over_a_more_recent_shorter_one():
    # suffix [1, 2, 3]: the trigram occurs at the start (followed by 7, 8); "3" alone occurs later (followed by 9)
    tokens = [1, 2, 3, 7, 8, 5, 3, 9, 1, 2, 3]
    assert NgramProposer(num_tokens=2, max_ngram=3).propose(tokens) == [7, 8]
    # with n limited to 1, the most recent "3" wins
    assert NgramProposer(num_tokens=2, max_ngram=1).propose(tokens) == [9, 1]


def test_most_recent_occurrence_among_equal_matches():
    tokens = [4, 5, 1, 4, 5, 2, 4, 5]
    assert NgramProposer(num_tokens=1, max_ngram=2).propose(tokens) == [2]


def test_limits_and_no_match():
    p = NgramProposer(num_tokens=4, max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert p.propose(tokens) == [3, 4, 5, 6]
    assert p.propose(tokens, limit=2) == [3, 4]
    assert p.propose(tokens, limit=0) == []
    assert p.propose([1, 2, 3, 4]) == []  # the last token never occurred before
    assert p.propose([5]) == []
    # the continuation stops at the end of the context
    assert p.propose([8, 8, 8]) == [8]
