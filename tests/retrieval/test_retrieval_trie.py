import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.trie import build_trie, empty_tree


def test_worked_example():
    tree = build_trie([[5, 6], [5, 7], [5, 6, 8], [9]], max_depth=8, max_branches=1)
    assert tree.tokens.tolist() == [5, 6, 8]
    assert tree.parents.tolist() == [-1, 0, 1]
    assert tree.depths.tolist() == [1, 2, 3]
    assert tree.counts.tolist() == [3, 2, 1]
    np.testing.assert_allclose(tree.probs, [3 / 4, 2 / 3, 1 / 2], rtol=1e-6)
    assert tree.num_occurrences == 4
    assert tree.path(2) == [5, 6, 8]


def test_breadth_first_and_sibling_order():
    tree = build_trie([[1, 2], [3], [3, 4], [3, 5], [1]], max_depth=4, max_branches=4)
    # root children 3 (count 3) before 1 (count 2); then children of 3, then of 1
    assert tree.tokens.tolist() == [3, 1, 4, 5, 2]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1]
    assert tree.counts.tolist() == [3, 2, 1, 1, 1]


def test_empty():
    tree = build_trie([], max_depth=4, max_branches=2)
    assert len(tree) == 0 and tree.num_occurrences == 0
    assert len(empty_tree()) == 0
    with pytest.raises(ValueError):
        build_trie([[1]], max_depth=0, max_branches=1)


@settings(max_examples=200, deadline=None)
@given(
    continuations=st.lists(st.lists(st.integers(0, 3), max_size=6), max_size=20),
    max_depth=st.integers(1, 5),
    max_branches=st.integers(1, 4),
)
def test_structure_and_limits(continuations, max_depth, max_branches):
    tree = build_trie(continuations, max_depth, max_branches)
    n = len(tree)
    assert len(tree.parents) == len(tree.depths) == len(tree.counts) == len(tree.probs) == n
    for i in range(n):
        parent = tree.parents[i]
        assert parent < i
        assert tree.depths[i] == (1 if parent < 0 else tree.depths[parent] + 1) <= max_depth
        parent_count = tree.num_occurrences if parent < 0 else tree.counts[parent]
        assert tree.probs[i] == pytest.approx(tree.counts[i] / parent_count)
        # the count is the number of continuations starting with the node's path
        path = tree.path(i)
        assert tree.counts[i] == sum(c[: len(path)] == path for c in continuations)
    assert list(tree.depths) == sorted(tree.depths)  # breadth first
    for parent in [-1, *range(n)]:
        siblings = [i for i in range(n) if tree.parents[i] == parent]
        assert len(siblings) <= max_branches
        assert [-tree.counts[i] for i in siblings] == sorted(-tree.counts[i] for i in siblings)
        assert len({int(tree.tokens[i]) for i in siblings}) == len(siblings)
