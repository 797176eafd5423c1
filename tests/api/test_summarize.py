"""Batch summarization: per-row errors, resume, and a kill -9 in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from api.backend import GenerationParams
from api.service import SUMMARY_INSTRUCTION, Services
from api.summarize import finished_keys, summarize

PARAMS = GenerationParams(max_tokens=3)


@pytest.fixture
def services(settings, backend):
    services = Services.open(settings, backend, recover=False)
    yield services
    services.close()


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rows_and_errors(tmp_path, services, backend):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": "a", "text": "first text"}\n\n{not json\n{"id": 7}\n"just a string"\n'
                       b'{"text": "' + b"word " * 600 + b'"}\n{"text": "last"}\n')
    out = tmp_path / "out.jsonl"
    report = summarize(services.generation, source, out, PARAMS, show_progress=False)
    assert (report.total, report.summarized, report.failed, report.skipped) == (6, 2, 4, 0)
    rows = {r["key"]: r for r in read_out(out)}
    assert list(rows) == ["line 1", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert rows["line 1"] | {"usage": None} == {"key": "line 1", "id": "a", "summary": "w0 w1 w2 ",
                                                "finish_reason": "length", "usage": None, "error": None}
    assert rows["line 1"]["usage"]["completion_tokens"] == 3
    assert "not a JSON line" in rows["line 3"]["error"] and rows["line 4"]["id"] == 7
    assert "'text'" in rows["line 4"]["error"] and "not a JSON object" in rows["line 5"]["error"]
    assert "max_tokens" in rows["line 6"]["error"]  # too long for the (fake) model: recorded, not fatal
    assert rows["line 7"]["summary"] == "w0 w1 w2 "
    prompt = [call[1] for call in backend.calls if call[0] == "complete"][0]
    assert prompt[0].content == SUMMARY_INSTRUCTION + "first text"


def test_resume_skips_finished_rows_and_repairs_a_torn_line(tmp_path, services):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    done = [{"key": "line 1", "summary": "old"}, {"key": "line 2", "summary": "old"},
            {"key": "line 1", "summary": "duplicate"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"key": "line 3", "summ')
    assert finished_keys(out) == {"line 1", "line 2"}
    report = summarize(services.generation, source, out, PARAMS, show_progress=False)
    assert (report.skipped, report.summarized) == (2, 3)
    rows = read_out(out)
    assert [r["key"] for r in rows] == ["line 1", "line 2", "line 3", "line 4", "line 5"]
    assert rows[0]["summary"] == "old" and rows[2]["summary"] == "w0 w1 w2 "
    assert summarize(services.generation, source, out, PARAMS, show_progress=False).skipped == 5


def test_folder_of_text_files(tmp_path, services):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.md").write_text("ay")
    (folder / "bad.txt").write_bytes(b"\xff\xfe")
    (folder / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "out.jsonl"
    report = summarize(services.generation, folder, out, PARAMS, show_progress=False)
    rows = read_out(out)
    assert [r["key"] for r in rows] == ["b.txt", "bad.txt", "sub/a.md"]
    assert rows[1]["error"].startswith("cannot read it as UTF-8") and report.failed == 1


KILLABLE = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import FakeBackend
    from api.backend import GenerationParams
    from api.service import Services
    from api.settings import Settings
    from api.summarize import summarize

    settings = Settings(data_dir=Path({data!r}))
    services = Services.open(settings, FakeBackend(delay_s={delay}), recover=False)
    summarize(services.generation, Path({source!r}), Path({out!r}), GenerationParams(max_tokens=4),
              show_progress=False)
    services.close()
""")


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": f"document number {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out.jsonl"

    def script(delay: float) -> list[str]:
        code = KILLABLE.format(tests=str(Path(__file__).parent), data=str(tmp_path / "data"), delay=delay,
                               source=str(source), out=str(out))
        return [sys.executable, "-c", code]

    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(script(0.01), env=env)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= 5):
        assert process.poll() is None and time.monotonic() < deadline, "the batch ended or stalled too early"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_bytes().count(b"\n")
    assert 5 <= written < 40
    subprocess.run(script(0.0), env=env, check=True, timeout=60)
    rows = read_out(out)
    assert sorted(r["id"] for r in rows) == list(range(40))
    assert len({r["key"] for r in rows}) == 40 and all(r["error"] is None for r in rows)
