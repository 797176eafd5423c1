import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.suffix_array import suffix_array


def test_banana_worked_example():
    assert suffix_array(np.array([1, 0, 2, 0, 2, 0])).tolist() == [5, 3, 1, 0, 4, 2]


def test_empty_and_single():
    assert suffix_array(np.array([], dtype=np.int64)).tolist() == []
    assert suffix_array(np.array([7])).tolist() == [0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-3, 3), max_size=80))
def test_matches_sorting_the_suffixes(seq):
    expected = sorted(range(len(seq)), key=lambda i: seq[i:])
    assert suffix_array(np.array(seq, dtype=np.int64)).tolist() == expected


def test_long_repeats_need_many_rounds():
    seq = np.tile(np.array([3, 1, 2]), 300)  # longest repeat ~ 900: ten doubling rounds
    expected = sorted(range(len(seq)), key=lambda i: seq[i:].tolist())
    assert suffix_array(seq).tolist() == expected
