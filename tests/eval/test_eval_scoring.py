"""Scorers against hand-computed values."""

import pytest

from eval.scoring import (
    exact_match,
    first_integer,
    kv_word_match,
    lcs_length,
    match_all,
    normalize_answer,
    passkey_match,
    rouge_l,
    score,
    token_f1,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Cat's hat, a RED one!", "cats hat red one"),
    ("An apple a day", "apple day"),
    ("theater anatomy", "theater anatomy"),  # articles only as whole words
    ("  Paris.\n", "paris"),
    ("a an the", ""),
    ("U.S.A.", "usa"),
    ("rock-and-roll", "rockandroll"),  # punctuation is removed, not turned into spaces
])
def test_squad_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_token_f1_hand_computed():
    # "cat sat on mat" vs "cat sat": 2 common, precision 2/4, recall 2/2 -> 2 * 0.5 * 1 / 1.5
    assert token_f1("the cat sat on the mat", ["a cat sat"]) == pytest.approx(2 / 3)
    assert token_f1("Paris", ["paris."]) == 1.0
    assert token_f1("blue whale", ["red fox"]) == 0.0


def test_token_f1_counts_repeats_once_per_match():
    # prediction "red red red", reference "red": common = min(3, 1) = 1; p = 1/3, r = 1 -> 0.5
    assert token_f1("red red red", ["red"]) == pytest.approx(0.5)


def test_token_f1_max_over_references_and_empty_sides():
    assert token_f1("george washington", ["john adams", "washington"]) == pytest.approx(2 / 3)
    assert token_f1("", ["paris"]) == 0.0
    assert token_f1("the", ["a"]) == 0.0  # both normalise to nothing: LongBench gives 0
    assert token_f1("paris", []) == 0.0


def test_exact_match_after_normalisation():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel Tower in Paris", ["eiffel tower"]) == 0.0
    assert exact_match("no", ["yes", "No!"]) == 1.0


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example: BCBA
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_worked_examples():
    # Lin (2004): LCS("police killed the gunman", "the gunman kill police") = "the gunman": P = R = 2/4
    assert rouge_l("the gunman kill police", ["police killed the gunman"]) == pytest.approx(0.5)
    # one substitution in six tokens: LCS 5, P = R = 5/6
    assert rouge_l("the cat lay on the mat", ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    # P = 3/3, R = 3/6 -> F = 2/3; case and punctuation ignored
    assert rouge_l("The cat, sat!", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l("", ["anything"]) == 0.0
    assert rouge_l("cat", ["dog", "cat"]) == 1.0


def test_match_all_is_the_fraction_found_ignoring_case():
    assert match_all("numbers: 111, 333", ["111", "222", "333", "444"]) == 0.5
    assert match_all("The magic number for LISBON is 48213.", ["48213"]) == 1.0
    with pytest.raises(ValueError):
        match_all("x", [])


def test_passkey_reads_the_first_integer():
    assert first_integer("The pass key is 71432.") == "71432"
    assert first_integer("no digits") is None
    assert passkey_match("It is 71432, I think", ["71432"]) == 1.0
    assert passkey_match("After 3 tries: 71432", ["71432"]) == 0.0


def test_kv_word_needs_the_whole_value_as_a_word():
    value = "6ad1060a-e365-4122-b2c3-7f914a90762a"
    assert kv_word_match(f'The value is "{value}".', [value]) == 1.0
    assert kv_word_match(f"{value}x", [value]) == 0.0
    assert kv_word_match(f"{{key: '{value}'}}", [value]) == 1.0


def test_score_dispatch_and_unscored():
    assert score("f1", "cat", ["cat"]) == 1.0
    assert score("none", "anything", []) is None
