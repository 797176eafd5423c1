"""Persistence of a prefilled, clustered document cache in one safetensors file.

The file holds every layer's ClusteredLayer tensors (and calibrated thresholds, if any) and is
memory-mapped on load. Its metadata names what it was built from: model id, model revision, a
hash of the build config (cluster config, dtype, token count, format version) and a checksum of
the document's token ids. Loading with a different key raises CacheMismatchError; a damaged or
truncated file (checked by a CRC-32 of every tensor) raises CacheCorruptError. Writes are atomic:
a temporary file in the same folder, fsynced, then os.replace.

Tensor names: layers.{i}.{keys,values,centroids,value_means,key_variances,sizes,offsets,permutation},
layers.{i}.coarse.{centroids,sizes,offsets}, layers.{i}.log_thresholds, layers.{i}.rest_estimated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kvcache.calibration import Thresholds
from kvcache.clustering import ClusterConfig, ClusteredLayer, CoarseLevel
from kvcache.selection import VARIANCE_WEIGHT

# 2: keys of bf16/fp16 models rotated with fp32 RoPE frequencies (1 rounded them); 3: per-cluster value means
# 4: key_variances
FORMAT_VERSION = 5  # 5: calibrated choice of the rest estimate

_LAYER_FIELDS = ("keys", "values", "centroids", "value_means", "key_variances", "sizes", "offsets", "permutation")
_COARSE_FIELDS = ("centroids", "sizes", "offsets")


class CacheError(Exception):
    """A stored document cache cannot be used."""


class CacheMismatchError(CacheError):
    """The file was built for another model, revision, config or document."""


class CacheCorruptError(CacheError):
    """The file is damaged, truncated or not a document cache."""


@dataclass(frozen=True)
class CacheKey:
    """What a stored cache was built from; a cache is used only under an equal key."""

    model_id: str
    model_revision: str
    config_hash: str
    token_checksum: str

    @classmethod
    def build(
        cls,
        model_id: str,
        model_revision: str,
        config: ClusterConfig,
        dtype: torch.dtype,
        token_ids: Sequence[int] | Tensor,
        budgets: Sequence[float] = (),
    ) -> CacheKey:
        """budgets: the calibrated ones; a cache calibrated for other budgets has no threshold for some asked."""
        tokens = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
        build = {
            "cluster_config": dataclasses.asdict(config),
            "budgets": [float(budget) for budget in budgets],
            "variance_weight": VARIANCE_WEIGHT,  # the calibrated thresholds were scored with it
            "dtype": str(dtype),
            "num_tokens": tokens.numel(),
            "format_version": FORMAT_VERSION,
        }
        config_hash = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()
        token_checksum = hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()
        return cls(model_id, model_revision, config_hash, token_checksum)


@dataclass(frozen=True)
class ClusteredCache:
    """A whole document cache: one ClusteredLayer per layer, optional thresholds per layer."""

    layers: tuple[ClusteredLayer, ...]
    thresholds: tuple[Thresholds, ...] | None = None

    def __post_init__(self) -> None:
        if self.thresholds is not None and len(self.thresholds) != len(self.layers):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.layers)} layers")


def save_cache(path: str | os.PathLike, cache: ClusteredCache, key: CacheKey) -> None:
    """Write `cache` under `key` to `path` atomically (readers see the old file or the new one)."""
    tensors = _flatten(cache)
    metadata = dataclasses.asdict(key) | {
        "format_version": str(FORMAT_VERSION),
        "num_layers": str(len(cache.layers)),
        "budgets": json.dumps(None if cache.thresholds is None else list(cache.thresholds[0].budgets)),
        "crc32": json.dumps({name: _crc32(tensor) for name, tensor in tensors.items()}),
    }
    _atomic_save(tensors, metadata, Path(path))


def load_cache(path: str | os.PathLike, key: CacheKey) -> ClusteredCache:
    """Load (memory-mapped) the cache at `path`, refusing a different key or a damaged file.

    Every tensor's CRC-32 is checked, which reads the whole file once (about 2.5 GB/s here);
    the tensors stay backed by the file's pages, not copied into process memory.
    """
    metadata, tensors = _read_verified(path, key)
    try:
        num_layers = int(metadata["num_layers"])
        budgets = json.loads(metadata["budgets"])
    except (KeyError, ValueError) as error:
        raise CacheCorruptError(f"{path}: metadata is damaged ({error})") from error
    try:
        return _unflatten(tensors, num_layers, budgets)
    except KeyError as error:
        raise CacheCorruptError(f"{path}: tensor {error} is missing") from error


def _read_verified(path: str | os.PathLike, key: CacheKey) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a file written under `key` whose every tensor matches its stored CRC-32;
    raises CacheMismatchError or CacheCorruptError otherwise."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            _check_key(path, metadata, key)
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise CacheCorruptError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        expected_crc = json.loads(metadata["crc32"])
    except (KeyError, ValueError) as error:
        raise CacheCorruptError(f"{path}: metadata is damaged ({error})") from error
    if set(expected_crc) != set(tensors):
        raise CacheCorruptError(f"{path}: tensors {sorted(set(expected_crc) ^ set(tensors))} missing or extra")
    for name, tensor in tensors.items():
        if _crc32(tensor) != expected_crc[name]:
            raise CacheCorruptError(f"{path}: checksum of {name} does not match, the file is damaged")
    return metadata, tensors


def _check_key(path: str | os.PathLike, metadata: dict[str, str], key: CacheKey) -> None:
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CacheMismatchError(f"{path}: format version {metadata.get('format_version')}, need {FORMAT_VERSION}")
    differing = [
        f"{field}: stored {metadata.get(field)!r}, wanted {wanted!r}"
        for field, wanted in dataclasses.asdict(key).items()
        if metadata.get(field) != wanted
    ]
    if differing:
        raise CacheMismatchError(f"{path} was built for something else: " + "; ".join(differing))


def _flatten(cache: ClusteredCache) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for index, layer in enumerate(cache.layers):
        prefix = f"layers.{index}."
        for field in _LAYER_FIELDS:
            tensors[prefix + field] = getattr(layer, field).contiguous()
        if layer.coarse is not None:
            for field in _COARSE_FIELDS:
                tensors[prefix + "coarse." + field] = getattr(layer.coarse, field).contiguous()
        if cache.thresholds is not None:
            thresholds = cache.thresholds[index]
            tensors[prefix + "log_thresholds"] = thresholds.log_thresholds.contiguous()
            if thresholds.rest_estimated is not None:
                tensors[prefix + "rest_estimated"] = thresholds.rest_estimated.contiguous()
    return tensors


def _unflatten(tensors: dict[str, Tensor], num_layers: int, budgets: list[float] | None) -> ClusteredCache:
    layers = []
    for index in range(num_layers):
        prefix = f"layers.{index}."
        coarse = None
        if prefix + "coarse.centroids" in tensors:
            coarse = CoarseLevel(**{field: tensors[prefix + "coarse." + field] for field in _COARSE_FIELDS})
        layers.append(ClusteredLayer(**{f: tensors[prefix + f] for f in _LAYER_FIELDS}, coarse=coarse))
    thresholds = None
    if budgets is not None:
        thresholds = tuple(
            Thresholds(tuple(budgets), tensors[f"layers.{index}.log_thresholds"],
                       tensors.get(f"layers.{index}.rest_estimated"))
            for index in range(num_layers)
        )
    return ClusteredCache(tuple(layers), thresholds)


def _crc32(tensor: Tensor) -> int:
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


class PrefillCheckpoints:
    """Saved slices of a document's dense prefill, so an interrupted ingest resumes where it stopped.

    Slice files `prefill-{start}-{end}.safetensors` hold every layer's keys and values of document
    positions [start, end) ([Hkv, end-start, D] each) with the document's key and CRCs in their
    metadata; each is written atomically like `save_cache`. `restore` returns the longest run of
    usable slices from position 0 and deletes anything else it finds (other keys, damaged files, gaps),
    so a stale or broken checkpoint costs a re-prefill, never a wrong cache.
    """

    PATTERN = "prefill-*.safetensors"

    def __init__(self, folder: str | os.PathLike, key: CacheKey):
        self.folder = Path(folder)
        self.key = key

    def save(self, start: int, layers: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Store positions [start, start + n) of every layer, layers[i] = (keys, values) [Hkv, n, D]."""
        end = start + layers[0][0].shape[1]
        tensors = {}
        for index, (keys, values) in enumerate(layers):
            tensors[f"layers.{index}.keys"] = keys.contiguous()
            tensors[f"layers.{index}.values"] = values.contiguous()
        metadata = dataclasses.asdict(self.key) | {
            "format_version": str(FORMAT_VERSION),
            "start": str(start),
            "end": str(end),
            "crc32": json.dumps({name: _crc32(tensor) for name, tensor in tensors.items()}),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, metadata, self.folder / f"prefill-{start:09d}-{end:09d}.safetensors")

    def restore(self) -> tuple[int, list[tuple[Tensor, Tensor]]]:
        """(n, layers): positions [0, n) restored, layers[i] = (keys, values) [Hkv, n, D]; (0, []) if none."""
        done, parts, broken = 0, [], False
        for path in sorted(self.folder.glob(self.PATTERN)):  # names sort by start position
            part = None if broken else self._read(path, done)
            if part is None:  # unusable, or after a gap: everything from here on is prefilled again
                broken = True
                path.unlink(missing_ok=True)
                continue
            done, layers = part
            parts.append(layers)
        if not parts:
            return 0, []
        merged = [
            (torch.cat([p[i][0] for p in parts], dim=1), torch.cat([p[i][1] for p in parts], dim=1))
            for i in range(len(parts[0]))
        ]
        return done, merged

    def clear(self) -> None:
        for path in self.folder.glob(self.PATTERN):
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def _read(self, path: Path, expected_start: int) -> tuple[int, list[tuple[Tensor, Tensor]]] | None:
        """The slice's end and tensors if it continues at `expected_start` under our key and is intact."""
        try:
            metadata, tensors = _read_verified(path, self.key)
            if int(metadata["start"]) != expected_start:
                return None
            num_layers = len(tensors) // 2
            layers = [(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]) for i in range(num_layers)]
            return int(metadata["end"]), layers
        except (CacheError, KeyError, ValueError, OSError):
            return None


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
