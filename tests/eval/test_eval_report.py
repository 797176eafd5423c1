"""Reports from hand-made results: the numbers are the hand-computed ones and the files open."""

import json

import matplotlib.image
import pytest

from eval.plots import length_label
from eval.report import Table, speed_rows, speed_summary, write_report
from eval.result import Result, read_results
from rapid.metrics import SpecStats


def result(mode, task="needle", length=1024, depth=0.5, score=1.0, identical=None, reference=None, drafts=0,
           accepted=0, emitted=10, decode=1.0, answer=2.0, example="e1"):
    stats = SpecStats(num_drafts=drafts, num_draft_tokens=4 * drafts, num_accepted_tokens=accepted,
                      num_emitted_tokens=emitted, decode_seconds=decode)
    return Result(example, task, length, depth, mode, "answer", [1, 2], ["x"], "match_all", score, reference,
                  identical, length, 0, 1.0, 64, 0.5, answer, stats)


def test_speed_summary_aggregates_before_dividing():
    a = result("rapid", drafts=4, accepted=6, emitted=10, decode=1.0, identical=True, reference="dense")
    b = result("rapid", drafts=6, accepted=4, emitted=20, decode=3.0, identical=False, reference="dense")
    summary = speed_summary([a, b])
    assert summary.acceptance_length == pytest.approx(1 + 10 / 10)
    assert summary.tokens_per_second == pytest.approx(30 / 4)
    assert summary.e2e_tokens_per_second == pytest.approx(30 / 4)
    assert (summary.identical, summary.checked) == (1, 2)


def test_speedup_is_against_dense_at_the_same_length():
    rows = speed_rows([
        result("dense", task="speed", length=2048, emitted=10, decode=2.0, score=None),
        result("rapid", task="speed", length=2048, emitted=10, decode=1.0, drafts=5, accepted=5, score=None),
        result("dense", task="speed", length=4096, emitted=10, decode=4.0, score=None),
        result("rapid", task="speed", length=4096, emitted=10, decode=1.0, score=None),
    ])
    assert [(r.length, r.mode, r.speedup) for r in rows] == [
        (2048, "dense", 1.0), (2048, "rapid", 2.0), (4096, "dense", 1.0), (4096, "rapid", 4.0)]
    assert rows[1].summary.acceptance_length == 2.0


def test_table_renderings():
    table = Table("T", ["a", "bb"], [["1", "2"], ["333", ""]])
    assert table.markdown() == "**T**\n\n| a | bb |\n|---|---|\n| 1 | 2 |\n| 333 |  |"
    assert table.text().splitlines() == ["T", "a    bb", "---  --", "1    2", "333"]


def test_length_labels():
    assert [length_label(n) for n in (300, 1024, 1536, 1200, 8192)] == ["300", "1K", "1.5K", "1200", "8K"]


def test_write_report_files(tmp_path):
    results = []
    for length in (1024, 2048):
        for depth in (0.1, 0.9):
            example = f"needle-{length}-{depth}"
            results.append(result("dense", length=length, depth=depth, score=1.0, example=example))
            results.append(result("rapid", length=length, depth=depth, score=1.0, identical=length == 1024,
                                  reference="dense", drafts=2, accepted=3, example=example))
            results.append(result("rag-only", length=length, depth=depth, score=0.0, example=example))
        results.append(result("dense", task="speed", length=length, score=None, decode=2.0))
        results.append(result("rapid", task="speed", length=length, score=None, decode=1.0, identical=True,
                              reference="dense", drafts=3, accepted=6))
    report = write_report(results, tmp_path, "test run", {"suite": "test", "wall_seconds": 1.0})
    names = sorted(f.name for f in report.files)
    assert names == ["heatmap_needle.png", "speed.png", "summary.json", "summary.md"]
    for png in ("heatmap_needle.png", "speed.png"):
        image = matplotlib.image.imread(tmp_path / png)
        assert image.shape[0] > 100 and image.shape[1] > 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quality"]["needle"] == {"dense": 1.0, "rag-only": 0.0, "rapid": 1.0}
    assert summary["greedy_identity"]["identical"] == 4 and summary["greedy_identity"]["checked"] == 6
    assert summary["greedy_identity"]["mismatches"] == ["needle-2048-0.1 rapid != dense",
                                                        "needle-2048-0.9 rapid != dense"]
    assert [row["speedup"] for row in summary["speed"]] == [1.0, 2.0, 1.0, 2.0]
    markdown = (tmp_path / "summary.md").read_text()
    assert "| task | examples | dense | rag-only | rapid |" in markdown  # columns in eval.modes' order
    assert "| needle | 4 | 1.00 | 0.00 | 1.00 |" in markdown
    assert "Greedy identity" in markdown and "![speed](speed.png)" in markdown


def test_results_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    original = result("rapid", identical=True, reference="dense", drafts=2, accepted=1)
    path.write_text(original.to_json() + "\n")
    assert read_results(path) == [original]
    assert json.loads(original.to_json())["mean_acceptance_length"] == 1.5
