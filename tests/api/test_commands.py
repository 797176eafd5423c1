"""The service's CLI subcommands, against a server (`--url`) and in-process on the tiny model."""

from __future__ import annotations

import argparse
import json

import pytest

from api.commands import add_service_commands
from api.main import create_app
from api.settings import Settings


def run(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="rapid")
    add_service_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("model", "device", "dtype")}
    return args.func(args, settings.model_copy(update={k: v for k, v in overrides.items() if v is not None}))


def test_subcommands_are_registered():
    parser = argparse.ArgumentParser(prog="rapid")
    add_service_commands(parser.add_subparsers(dest="command"))
    for argv in (["serve", "--port", "9"], ["ingest", "f.txt"], ["ask", "doc-1", "why?"],
                 ["summarize", "in.jsonl", "--out", "o.jsonl"]):
        assert callable(parser.parse_args(argv).func)
    with pytest.raises(SystemExit):
        parser.parse_args(["summarize", "in.jsonl"])  # --out is required


def test_ingest_and_ask_against_a_server(tmp_path, settings, backend, capsys, Server):
    document = tmp_path / "doc.txt"
    document.write_text("one two three four")
    with Server(create_app(settings, backend)) as server:
        assert run(["ingest", str(document), "--url", server.url], settings) == 0
        doc_id = capsys.readouterr().out.strip()
        assert doc_id.startswith("doc-")
        assert run(["ask", doc_id, "what comes after one?", "--url", server.url, "--max-tokens", "3"], settings) == 0
        captured = capsys.readouterr()
        assert captured.out == "w0 w1 w2 \n" and "cited: chunk 0 (chars 0-12)" in captured.err
        assert run(["ask", "doc-000000000000000000000000", "q", "--url", server.url], settings) == 1
        assert "HTTP 404" in capsys.readouterr().err
    assert run(["ingest", str(tmp_path / "missing.txt"), "--url", "http://127.0.0.1:9"], settings) == 1


def test_api_key_is_sent(tmp_path, settings, backend, capsys, Server):
    document = tmp_path / "doc.txt"
    document.write_text("secret words")
    settings = settings.model_copy(update={"api_keys": ("s3cret",)})
    with Server(create_app(settings, backend)) as server:
        assert run(["ingest", str(document), "--url", server.url], settings) == 1
        assert "HTTP 401" in capsys.readouterr().err
        assert run(["ingest", str(document), "--url", server.url, "--api-key", "s3cret"], settings) == 0


def test_in_process_on_the_tiny_model(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path / "data", model="tiny", device="cpu", chunk_tokens=64,
                        rag_min_tokens=128)
    document = tmp_path / "doc.txt"
    document.write_text("The mill by the river grinds wheat every autumn. " * 20)
    assert run(["ingest", str(document)], settings) == 0
    doc_id = capsys.readouterr().out.strip()
    assert run(["ask", doc_id, "What does the mill grind?", "--max-tokens", "4"], settings) == 0
    assert "target read the document" in capsys.readouterr().err

    assert run(["ask", "--file", str(document), "What does the mill grind?", "--max-tokens", "4", "--drafter",
                "retrieval", "--recycle"], settings) == 0  # this process: ingest, then answer
    assert "drafter retrieval + recycling" in capsys.readouterr().err

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "A short text to summarize."}) + "\n" + "{broken\n")
    out = tmp_path / "out.jsonl"
    assert run(["summarize", str(rows), "--out", str(out), "--max-tokens", "4", "--no-progress"], settings) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["error"] is None and records[0]["usage"]["completion_tokens"] <= 4
    assert records[1]["error"].startswith("not a JSON line")
