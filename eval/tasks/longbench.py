"""Document QA over any LongBench-format JSONL file: one object a line with `input` (the question; empty
for summaries), `context` (the document) and `answers` (references); `dataset`, `_id` and
`all_classes` are optional, as in LongBench's release.

The metric follows LongBench's table: ROUGE-L for its summary sets, token F1 otherwise (unless the
caller picks one); its scripts also keep only the first line of the answer for a few sets. A
prompt longer than the model's limit is cut in the middle by the runner (eval.truncation), as
LongBench's prediction script does. LongBench's Chinese sets are scored there on jieba words; here
every set is scored on whitespace tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval.tasks.example import Example, Metric

SUMMARY_DATASETS = frozenset({"gov_report", "qmsum", "multi_news", "vcsum", "samsum"})
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
SUMMARY_QUESTION = "Write a one-paragraph summary of the document."
CONCISE = "Answer as concisely as you can, in a few words."


class LongBenchFormatError(ValueError):
    """A line of the file is not a LongBench record."""


@dataclass(frozen=True)
class LongBenchConfig:
    path: Path
    metric: Metric | None = None  # None: ROUGE-L for LongBench's summary sets, token F1 for the rest
    limit: int | None = None  # read at most this many records
    max_new_tokens: int | None = None  # None: 256 for ROUGE-L, 64 otherwise


def dataset_metric(dataset: str) -> Metric:
    return "rouge_l" if dataset in SUMMARY_DATASETS else "f1"


def question_for(question: str, metric: Metric) -> str:
    """The text asked: the record's input (or a summary request when it is empty), told to be brief when
    scored by overlap with short references."""
    question = question.strip() or SUMMARY_QUESTION
    return f"{question}\n{CONCISE}" if metric in ("f1", "exact_match") else question


def parse_record(record: object, where: str) -> tuple[str, str, tuple[str, ...]]:
    if not isinstance(record, dict):
        raise LongBenchFormatError(f"{where}: expected a JSON object")
    context, question, answers = record.get("context"), record.get("input", ""), record.get("answers")
    if not isinstance(context, str) or not context.strip():
        raise LongBenchFormatError(f"{where}: `context` must be a non-empty string")
    if not isinstance(question, str):
        raise LongBenchFormatError(f"{where}: `input` must be a string")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise LongBenchFormatError(f"{where}: `answers` must be a non-empty list of strings")
    return context, question, tuple(answers)


def longbench_examples(config: LongBenchConfig) -> list[Example]:
    examples = []
    with open(config.path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if config.limit is not None and len(examples) >= config.limit:
                break
            where = f"{config.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LongBenchFormatError(f"{where}: not JSON ({err})") from err
            context, question, answers = parse_record(record, where)
            dataset = str(record.get("dataset") or config.path.stem)
            metric = config.metric or dataset_metric(dataset)
            max_new_tokens = config.max_new_tokens or (256 if metric == "rouge_l" else 64)
            example_id = str(record.get("_id") or f"{dataset}-{number}")
            examples.append(Example(example_id, f"longbench-{dataset}", example_id, context,
                                    question_for(question, metric), answers, metric, max_new_tokens, 0,
                                    first_line_only=dataset in FIRST_LINE_DATASETS))
    return examples
