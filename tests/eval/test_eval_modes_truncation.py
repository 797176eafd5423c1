"""Mode configs and middle truncation."""

import pytest

from api.qa import QAConfig
from eval.modes import MODES, Mode, resolve_modes, sort_modes
from eval.truncation import keep_middle_out, truncate_middle


def test_resolve_modes_puts_references_first_once():
    assert [m.name for m in resolve_modes(["rapid", "rapid-squeezed", "dense"])] == [
        "dense", "rapid", "squeezed", "rapid-squeezed"]
    with pytest.raises(ValueError, match="unknown modes"):
        resolve_modes(["fast"])


def test_sort_modes_follows_the_registry():
    assert sort_modes(["rapid", "mine", "dense", "rapid", "squeezed"]) == ["dense", "squeezed", "rapid", "mine"]


def test_modes_map_to_qa_config_and_ask_options():
    base = QAConfig(tree_budget=8)
    rapid = MODES["rapid"].qa_config(base)
    assert (rapid.drafter, rapid.attention, rapid.tree_budget) == ("self", "dense", 8)
    assert MODES["squeezed"].qa_config(base).attention == "squeezed"
    assert MODES["rapid"].ask_options(12).sampling.greedy and MODES["rapid"].ask_options(12).max_new_tokens == 12
    eta = MODES["rapid-eta"].ask_options(10)
    assert eta.eta == 1.0 and eta.sampling.temperature == 0.5 and eta.sampling.seed == 0
    assert MODES["rag-only"].rag_only


def test_mode_rules():
    with pytest.raises(ValueError, match="needs sampling"):
        Mode("bad", "", eta=1.0)
    with pytest.raises(ValueError, match="only greedy"):
        Mode("bad", "", temperature=0.5, reference="dense")


def test_keep_middle_out_worked_examples():
    assert keep_middle_out(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert keep_middle_out(list(range(10)), 4) == [0, 1, 8, 9]
    assert keep_middle_out(list(range(3)), 5) == [0, 1, 2]
    assert keep_middle_out(list(range(10)), 1) == [9]
    with pytest.raises(ValueError):
        keep_middle_out([1], 0)


def test_truncate_middle_keeps_head_and_tail_characters(byte_tok):
    text = "HEAD" + "m" * 100 + "TAIL"
    cut = truncate_middle(text, byte_tok, 8)
    assert cut.text == "HEADTAIL" and (cut.original_tokens, cut.tokens, cut.cut_tokens) == (108, 8, 100)
    same = truncate_middle(text, byte_tok, 500)
    assert same.text == text and same.cut_tokens == 0


@pytest.mark.slow
def test_truncate_middle_fits_a_merging_tokenizer(default_tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    cut = truncate_middle(text, default_tokenizer, 101)
    assert len(default_tokenizer(cut.text, add_special_tokens=False).input_ids) <= 101
    assert cut.text.startswith("word0 word1") and cut.text.endswith("word398 word399")
