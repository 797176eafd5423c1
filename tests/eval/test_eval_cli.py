"""`rapid eval` and `rapid bench` end to end on the tiny model (seconds)."""

import argparse
import json

import pytest

from api.cli import main
from eval.cli import tokens
from eval.result import read_results

FAST = ["--model", "tiny", "--device", "cpu", "--rag-tokens", "64", "--chunk-tokens", "64", "--no-progress"]


def test_token_counts():
    assert [tokens(t) for t in ("4096", "4K", "4k", "1.5K")] == [4096, 4096, 4096, 1536]
    for bad in ("x", "0", "1.3"):
        with pytest.raises(argparse.ArgumentTypeError):
            tokens(bad)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_needle_writes_every_report_file(tmp_path, capsys):
    out = tmp_path / "needle"
    code = main(["eval", "needle", *FAST, "--lengths", "200", "400", "--depths", "0.2", "0.8",
                 "--modes", "dense,rapid", "--out", str(out)])
    assert code == 0
    summary = last_json(capsys)
    assert summary["suite"] == "needle" and summary["answers"] == 8
    assert summary["greedy_identity"] == {"identical": 4, "checked": 4, "mismatches": []}
    for name in ("examples.jsonl", "summary.md", "summary.json", "heatmap_needle.png"):
        assert (out / name).is_file()
    assert len(read_results(out / "examples.jsonl")) == 8
    assert main(["eval", "report", str(out)]) == 0
    assert last_json(capsys)["greedy_identity"]["checked"] == 4


def test_bench_reports_speedups(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["bench", *FAST, "--lengths", "300", "--questions", "1", "--max-new-tokens", "8",
                 "--modes", "retrieval", "--out", str(out)]) == 0
    rows = last_json(capsys)["speed"]
    assert [r["mode"] for r in rows] == ["dense", "retrieval"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and rows[1]["identical"] == 1
    assert (out / "speed.png").is_file()


def test_longbench_file(tmp_path, capsys):
    data = tmp_path / "qasper.jsonl"
    data.write_text(json.dumps({"input": "Who?", "context": "Ann wrote the letter. " * 40, "answers": ["Ann"]}) + "\n")
    out = tmp_path / "lb"
    assert main(["eval", "longbench", str(data), *FAST, "--modes", "dense", "--max-new-tokens", "4",
                 "--max-document-tokens", "300", "--out", str(out)]) == 0
    result, = read_results(out / "examples.jsonl")
    assert result.task == "longbench-qasper" and result.metric == "f1" and 0.0 <= result.score <= 1.0
    assert result.document_tokens <= 300 and result.cut_tokens > 0
    assert "longbench-qasper" in last_json(capsys)["quality"]
