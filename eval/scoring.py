"""Answer scoring, each rule written after the benchmark it comes from.

- `token_f1` and `exact_match`: SQuAD answer normalisation (lower case, punctuation dropped, the
  articles a/an/the dropped, whitespace collapsed), then bag-of-tokens F1 or string equality, the max
  over the references, as LongBench's `qa_f1_score`. Like LongBench, no common token means 0, also
  when both sides normalise to nothing.
- `rouge_l`: ROUGE-L F-measure (beta = 1) from the longest common subsequence of lower-cased
  alphanumeric tokens, max over the references. LongBench's scripts call the `rouge` package, which
  splits sentences differently; its numbers can differ slightly from these.
- `match_all` (RULER's string_match_all, also our needle hit): the fraction of references that
  occur in the answer, case-insensitively.
- `passkey` (InfiniteBench): the first integer in the answer equals the key.
- `kv_word` (InfiniteBench kv_retrieval): the value is one of the answer's words once newlines,
  quotes and punctuation are turned into spaces.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from eval.tasks.example import Metric

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_KV_SEPARATORS = re.compile(r"[\n:\"'.,?!{}]")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, strip punctuation, drop articles, collapse whitespace.

    >>> normalize_answer("The  Cat's hat, a RED one!")
    'cats hat red one'
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    same = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Max over references of the F1 of normalised token bags.

    >>> round(token_f1("the cat sat on the mat", ["a cat sat"]), 4)  # 2 common of 4 and 2 tokens
    0.6667
    """
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(r).split()) for r in references), default=0.0)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1, max over references.

    Worked example: "police killed the gunman" against "the gunman kill police": the LCS is
    "the gunman" (2 tokens), precision = recall = 2/4, F = 0.5.
    """
    candidate = rouge_tokens(prediction)
    best = 0.0
    for reference in references:
        target = rouge_tokens(reference)
        common = lcs_length(candidate, target)
        if common:
            precision, recall = common / len(candidate), common / len(target)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction, ignoring case."""
    if not references:
        raise ValueError("match_all needs at least one reference")
    lowered = prediction.lower()
    return sum(r.lower() in lowered for r in references) / len(references)


def first_integer(text: str) -> str | None:
    found = re.search(r"\d+", text)
    return found.group() if found else None


def passkey_match(prediction: str, references: Sequence[str]) -> float:
    return float(first_integer(prediction) in references)


def kv_word_match(prediction: str, references: Sequence[str]) -> float:
    words = set(_KV_SEPARATORS.sub(" ", prediction).split())
    return float(any(r in words for r in references))


_SCORERS = {
    "match_all": match_all, "passkey": passkey_match, "kv_word": kv_word_match,
    "f1": token_f1, "rouge_l": rouge_l, "exact_match": exact_match,
}


def score(metric: Metric, prediction: str, references: Sequence[str]) -> float | None:
    """The example's score in [0, 1]; None for metric "none" (speed prompts have no reference)."""
    if metric == "none":
        return None
    return _SCORERS[metric](prediction, references)
