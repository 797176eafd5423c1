import pytest

from rapid.budget import TreeBudget


def observed(policy: str, steps: list[tuple[int, int, int, float]], low: int = 1, high: int = 16) -> TreeBudget:
    budget = TreeBudget(policy, low, high, decay=1.0)
    for step in steps:
        budget.observe(*step)
    return budget


def test_docstring_example_picks_one_node():
    # p = 0.5: 4 accepted, 4 failures (plus the Beta(1, 1) prior); step seconds = 1 + 0.25 n exactly
    steps = [(0, 0, 0, 1.0), (2, 2, 1, 1.5), (4, 4, 1, 2.0), (2, 2, 1, 1.5), (4, 4, 1, 2.0)]
    budget = observed("cost", steps)
    assert budget.cost.fit() == pytest.approx((1.0, 0.25))
    assert budget.next() == 1


def test_cheap_nodes_and_high_acceptance_get_a_big_tree():
    steps = [(0, 0, 0, 1.0)] + [(8, 8, 8, 1.08)] * 6  # everything accepted, a node costs 1% of a step
    assert observed("cost", steps).next() == 16


def test_expensive_nodes_shrink_the_tree_even_with_good_acceptance():
    steps = [(0, 0, 0, 1.0)] + [(8, 8, 6, 5.0)] * 6  # a node costs half a step
    assert observed("cost", steps).next() <= 2


def test_until_step_sizes_differ_the_acceptance_rule_decides():
    budget = observed("cost", [(4, 4, 4, 2.0)] * 3)
    assert budget.cost.fit() is None
    assert budget.next() == observed("acceptance", [(4, 4, 4, 2.0)] * 3).next()


def test_fixed_and_bounds():
    assert observed("fixed", [(0, 0, 0, 1.0)], high=8).next() == 8
    assert 3 <= observed("cost", [(0, 0, 0, 1.0), (8, 8, 0, 9.0)], low=3, high=5).next() <= 5
    with pytest.raises(ValueError):
        TreeBudget("cost", 0, 4)


def test_seeded_sampling_never_sizes_trees_from_timings():
    assert TreeBudget.for_request("cost", 1, 8, seeded_sampling=True).policy == "acceptance"
    assert TreeBudget.for_request("cost", 1, 8, seeded_sampling=False).policy == "cost"
    assert TreeBudget.for_request("fixed", 1, 8, seeded_sampling=True).policy == "fixed"
