"""Task generators: deterministic by seed, sized in tokens, and the needle is where they say."""

import json

import pytest

from eval.tasks.haystack import fit_tokens, token_count
from eval.tasks.kv_retrieval import KVConfig, kv_examples
from eval.tasks.longbench import CONCISE, SUMMARY_QUESTION, LongBenchConfig, LongBenchFormatError, longbench_examples
from eval.tasks.needle import NeedleConfig, names, needle_examples, spread_depths
from eval.tasks.passkey import PasskeyConfig, passkey_examples
from eval.tasks.ruler import RulerConfig, ruler_examples
from eval.tasks.speed import SpeedConfig, speed_examples


def test_fit_tokens_finds_the_largest_fitting_count(byte_tok):
    build = lambda n: "ab" * n  # noqa: E731  (2 tokens per unit with the byte tokenizer)
    assert fit_tokens(byte_tok, build, 9, 100) == "ab" * 4
    with pytest.raises(ValueError, match="too short"):
        fit_tokens(byte_tok, build, 9, 3)
    with pytest.raises(ValueError, match="fixed part"):
        fit_tokens(byte_tok, lambda n: "x" * (20 + n), 9, 100)


def test_helpers_worked_examples():
    assert spread_depths(0.4, 3) == pytest.approx([0.4, 0.6, 0.8])
    assert names(["A"]) == "A" and names(["A", "B", "C"]) == "A, B and C"


def test_needle_grid_is_deterministic_and_sized(byte_tok, corpus):
    config = NeedleConfig(lengths=(400, 900), depths=(0.0, 0.5, 1.0), seed=3)
    examples = needle_examples(byte_tok, corpus, config)
    assert examples == needle_examples(byte_tok, corpus, config)
    assert examples != needle_examples(byte_tok, corpus, NeedleConfig(lengths=(400, 900), depths=(0.0, 0.5, 1.0)))
    assert [(e.length, e.depth) for e in examples] == [(n, d) for n in (400, 900) for d in (0.0, 0.5, 1.0)]
    for example in examples:
        tokens = token_count(byte_tok, example.context)
        assert example.length - 40 <= tokens <= example.length
        (start, end), = example.needle_spans
        needle = example.context[start:end]
        assert needle.startswith("The special magic number for ") and needle.endswith(f"is {example.references[0]}.")
        assert needle.split(" for ")[1].split(" is ")[0] in example.question
        # inserted at the first sentence end at or after the depth (sentences here are < 150 characters)
        assert example.depth * len(example.context) - len(needle) - 1 <= start
        assert start <= example.depth * len(example.context) + 150


def test_multi_needle_spreads_needles_after_the_first(byte_tok, corpus):
    example, = needle_examples(byte_tok, corpus, NeedleConfig(lengths=(1200,), depths=(0.3,), num_needles=3))
    assert example.task == "needle-3" and len(example.references) == 3
    starts = [s for s, _ in example.needle_spans]
    assert starts == sorted(starts)
    for (start, end), value in zip(example.needle_spans, example.references, strict=True):
        assert example.context[start:end].endswith(f"is {value}.")
    assert example.question.startswith("What are the special magic numbers for ")


def test_passkey(byte_tok):
    examples = passkey_examples(byte_tok, PasskeyConfig(lengths=(500,), depths=(0.25, 0.75), seed=1))
    assert examples == passkey_examples(byte_tok, PasskeyConfig(lengths=(500,), depths=(0.25, 0.75), seed=1))
    for example in examples:
        (start, end), = example.needle_spans
        key = example.references[0]
        assert example.context[start:end] == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert len(key) == 5 and example.metric == "passkey"
        assert token_count(byte_tok, example.context) <= 500
    assert examples[0].needle_spans[0][0] < examples[1].needle_spans[0][0]


def test_kv_retrieval_pair_sits_at_its_depth(byte_tok):
    example, = kv_examples(byte_tok, KVConfig(lengths=(1500,), depths=(0.5,)))
    data = json.loads(example.context.split("JSON data:\n", 1)[1])
    key = example.question.split('"')[1]
    assert data[key] == example.references[0]
    position = list(data).index(key)
    assert abs(position - len(data) / 2) <= 1
    start, end = example.needle_spans[0]
    assert example.context[start:end] == f'"{key}": "{example.references[0]}"'
    assert token_count(byte_tok, example.context) <= 1500


def test_ruler_variants(byte_tok, corpus):
    config = RulerConfig(lengths=(1200,), depths=(0.5,), distractors=2, values=3, queries=2)
    examples = {e.task: e for e in ruler_examples(byte_tok, corpus, config)}
    assert examples == {e.task: e for e in ruler_examples(byte_tok, corpus, config)}
    single, multikey = examples["ruler-single"], examples["ruler-multikey"]
    multivalue, multiquery = examples["ruler-multivalue"], examples["ruler-multiquery"]
    assert len(single.needle_spans) == 1 and len(single.references) == 1
    assert len(multikey.needle_spans) == 3 and len(multikey.references) == 1
    assert len(multivalue.needle_spans) == 3 and len(multivalue.references) == 3
    assert len(multiquery.needle_spans) == 2 and len(multiquery.references) == 2
    for example in examples.values():
        first_start, first_end = example.needle_spans[0]
        assert example.context[first_start:first_end].endswith(f"is: {example.references[0]}.")
        assert example.context.startswith("Some special magic numbers are hidden")
        assert token_count(byte_tok, example.context) <= 1200
    asked_key = multikey.context[slice(*multikey.needle_spans[0])].split(" for ")[1].split(" is")[0]
    assert asked_key in multikey.question
    noise = ruler_examples(byte_tok, corpus, RulerConfig(lengths=(600,), variants=("single",), haystack="noise"))
    assert "The grass is green." in noise[0].context


def test_speed_questions_share_one_document(byte_tok, corpus):
    examples = speed_examples(byte_tok, corpus, SpeedConfig(lengths=(300, 600), questions=("q1?", "q2?")))
    assert [e.document_id for e in examples] == ["speed-300-s0"] * 2 + ["speed-600-s0"] * 2
    assert examples[0].context == examples[1].context != examples[2].context
    assert all(e.metric == "none" and not e.references for e in examples)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")


def test_longbench_records(tmp_path):
    path = tmp_path / "qasper.jsonl"
    write_jsonl(path, [
        {"input": "Who wrote it?", "context": "A long text.", "answers": ["Ann"], "_id": "x1"},
        {"input": "", "context": "Another text.", "answers": ["a summary"], "dataset": "gov_report"},
        {"input": "Which type?", "context": "Text.", "answers": "LOC", "dataset": "trec"},
    ])
    first, second, third = longbench_examples(LongBenchConfig(path))
    assert (first.id, first.task, first.metric, first.max_new_tokens) == ("x1", "longbench-qasper", "f1", 64)
    assert first.question == f"Who wrote it?\n{CONCISE}" and first.references == ("Ann",)
    assert (second.metric, second.question, second.max_new_tokens) == ("rouge_l", SUMMARY_QUESTION, 256)
    assert second.id == "gov_report-2"
    assert third.first_line_only and third.references == ("LOC",)
    assert len(longbench_examples(LongBenchConfig(path, metric="exact_match", limit=2))) == 2


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "not JSON"),
    ('{"input": "q", "answers": ["a"]}', "context"),
    ('{"input": "q", "context": "c", "answers": []}', "answers"),
    ("[1, 2]", "JSON object"),
])
def test_longbench_bad_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "q", "context": "c", "answers": ["a"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LongBenchFormatError, match=f"bad.jsonl:2: .*{message}"):
        longbench_examples(LongBenchConfig(path))
