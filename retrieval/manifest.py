"""The JSON manifest saved beside an index or datastore: format, version, fields and file checksums.

A store directory is complete when its `manifest.json` exists (written last). Loading checks the
format name and version, then the sha256 of every listed file, so a corrupt, truncated or swapped
file is refused before any of it is parsed.
"""

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"


class FormatError(Exception):
    """A saved index or datastore that cannot be used: names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, format_name: str, version: int, fields: dict, files: list[str]) -> None:
    """Write `manifest.json`: `fields` and the sha256 of each of `files` (names inside `directory`)."""
    manifest = {
        "format": format_name,
        "format_version": version,
        **fields,
        "files": {name: file_sha256(directory / name) for name in files},
    }
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / MANIFEST_NAME)


def read_manifest(directory: Path, format_name: str, version: int, error: type[FormatError] = FormatError) -> dict:
    """Read and check `directory/manifest.json`; verify every listed file's checksum; return the manifest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise error(path, "missing manifest (not a saved store, or saving did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(path, f"manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise error(path, "manifest is not a JSON object")
    if manifest.get("format") != format_name:
        raise error(path, f"format is {manifest.get('format')!r}, expected {format_name!r}")
    if manifest.get("format_version") != version:
        raise error(path, f"format_version is {manifest.get('format_version')!r}, this code reads {version}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise error(path, "manifest has no 'files' checksums")
    for name, expected in files.items():
        file = path.parent / name
        if Path(name).name != name:
            raise error(path, f"file name {name!r} is not a plain name")
        if not file.is_file():
            raise error(file, "missing file listed in the manifest")
        actual = file_sha256(file)
        if actual != expected:
            raise error(file, f"sha256 {actual} does not match the manifest's {expected} (corrupt or truncated)")
    return manifest


def manifest_field(manifest: dict, key: str, kind: type, directory: Path, error: type[FormatError]):
    """`manifest[key]`, checked to be of type `kind`."""
    value = manifest.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise error(Path(directory) / MANIFEST_NAME, f"field {key!r} is {value!r}, expected {kind.__name__}")
    return value
