"""Document QA on the tiny random model: the recycling drafter's table comes from the ingest prefill."""

import pytest

from api.qa import AskOptions, DocumentQA, QAConfig
from rapid.models import ModelSpec, load_model
from retrieval.embedding import Embedder
from retrieval.texts import synthetic_filler


@pytest.fixture(scope="module")
def qa_pair():
    lm = load_model(ModelSpec("tiny", device="cpu"))
    embedder = Embedder()
    plain = DocumentQA(lm, embedder, QAConfig(drafter="none", tree_budget=4, answer_reserve=64))
    recycling = DocumentQA(lm, embedder, QAConfig(drafter="retrieval", recycle=True, tree_budget=4, answer_reserve=64))
    return plain, recycling


def test_recycling_answers_equal_the_plain_loop_and_ingest_keeps_every_prefix_row(qa_pair):
    plain, recycling = qa_pair
    text = synthetic_filler(1500, seed=3)
    document = recycling.ingest(text)
    assert plain.ingest(text).next_tokens is None
    prefix = recycling.prompt.head_ids + document.token_ids.tolist()
    assert len(document.next_tokens.pairs) == len(set(zip([-1, *prefix[:-1]], prefix, strict=True)))
    question = "What does the text say about the river?"
    reference = [t for chunk in plain.ask(document, question, AskOptions(max_new_tokens=24)).tokens for t in chunk]
    answer = recycling.ask(document, question, AskOptions(max_new_tokens=24))
    assert [t for chunk in answer.tokens for t in chunk] == reference
    assert answer.stats.num_drafts > 0
