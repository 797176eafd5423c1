"""The C kernel that attends over key ranges of a stored cache in place (csrc/range_attention.c).

Squeezed attention's selected clusters are contiguous ranges of the cluster-ordered cache. Copying them
into one buffer for SDPA reads the rows, writes them and reads them again; the kernel reads each range
once. Measured here (1 thread, bf16, 128K tokens, 3 kv heads, 10% of the keys in 1968 ranges): 2.3 ms,
against 28 ms for SDPA over every key; over every key the kernel takes 26-28 ms, so it is no faster than
SDPA per key read, it only reads fewer.

`cache_attention` serves dense bf16 caches for a few queries (decode steps and trees, rapid.attention): logits
first, then exp and values in cache order (AMX tiles for the logits and for the values of a row's first keys,
where the CPU has them), so a tree node's bits equal the decode step's of its path. One layer of the default
model at 16K keys (9 heads, 1 thread, interleaved medians of 21): 2.9 ms for one query and 7.9 for 16, against
2.9 and 12.7 for SDPA and 2.2 and 9.3 with the values weighed by FMAs alone (tiles cost a lone decode step more
than they save it). Without value tiles, where vdpbf16ps adds a pair's products in order, the values are weighed
two keys per instruction with the FMAs' sums (`value_pairs_supported`): at 16K a 5-query tree's attention over 30
layers took 32.1 ms against 38.0 with FMAs, and a whole 5-query forward as long as a decode step.

The library is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for this CPU
(-march=native) into ~/.cache/rapid/kernels (`RAPID_KERNEL_DIR`), keyed by source, flags, compiler and
CPU. Without a compiler, or with `RAPID_NATIVE_KERNELS=0`, `load()` returns None and callers use their
torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "range_attention.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared")
MAX_ROWS, MAX_DIM = 512, 256  # the kernel's fixed buffers (range_attention.c)
EMPTY_LSE = -1e30  # the kernel's log-sum-exp for a row that read nothing (it is built without infinities)
KERNEL_DTYPES = (torch.bfloat16, torch.float32)

_POINTER = ctypes.c_void_p
_INT64 = ctypes.c_int64


def kernel_dir() -> Path:
    return Path(os.environ.get("RAPID_KERNEL_DIR", Path.home() / ".cache" / "rapid" / "kernels"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target` atomically, so concurrent first uses never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(built, target)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built here (logged once)."""
    if os.environ.get("RAPID_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True).stdout
        key = hashlib.sha256("\n".join([SOURCE.read_text(), *FLAGS, version, _cpu_flags()]).encode()).hexdigest()
        target = kernel_dir() / f"range_attention-{key[:16]}.so"
        if not target.exists():
            log.info("compiling the range-attention kernel into %s", target)
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("native range attention unavailable, squeezed attention falls back to torch: %s", detail)
        return None
    library.range_attention.restype = ctypes.c_int
    pointers, sizes = [_POINTER] * 4, [_INT64] * 4  # query keys values, 2 flags, starts ends offsets mask, sizes
    library.range_attention.argtypes = [
        *pointers[:3],
        ctypes.c_int,
        ctypes.c_int,
        *pointers,
        *sizes,
        _POINTER,
        _POINTER,
    ]
    library.centroid_logits.restype = None
    library.centroid_logits.argtypes = [_POINTER, _POINTER, ctypes.c_int, *sizes, _POINTER]
    library.select_ranges.restype = _INT64
    library.select_ranges.argtypes = [*pointers, _POINTER, *sizes, *pointers, _POINTER, _POINTER, _POINTER]
    library.refined_attention.restype = ctypes.c_int
    library.refined_attention.argtypes = [
        *pointers[:3],
        ctypes.c_int,
        ctypes.c_int,
        *pointers,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT64,
        *sizes,
        _INT64,
        _INT64,
        _POINTER,
        _POINTER,
        _POINTER,
    ]
    library.cache_attention.restype = ctypes.c_int
    library.cache_attention.argtypes = [
        _POINTER,
        ctypes.c_float,
        *pointers[:2],
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        *sizes,
        _INT64,
        _INT64,
        _POINTER,
        _INT64,
        _POINTER,
    ]
    library.value_pairs_supported.restype = ctypes.c_int
    library.value_pairs_supported.argtypes = []
    library.rest_estimate.restype = ctypes.c_int
    library.rest_estimate.argtypes = [*pointers, _POINTER, ctypes.c_int, *sizes, _INT64, ctypes.c_float, _POINTER,
                                      _POINTER]
    library.weighted_means.restype = None
    library.weighted_means.argtypes = [_POINTER, _POINTER, ctypes.c_int, *sizes, ctypes.c_float, _POINTER]
    return library


def supports(keys: Tensor, rows: int) -> bool:
    """Whether the kernel can serve these stored keys [Hkv, T, D] for `rows` query rows per kv head."""
    return (
        keys.device.type == "cpu"
        and keys.dtype in KERNEL_DTYPES
        and keys.is_contiguous()
        and rows <= MAX_ROWS
        and keys.shape[-1] <= MAX_DIM
        and load() is not None
    )


def supports_cache(keys: Tensor, values: Tensor, rows: int) -> bool:
    """Whether cache_attention can read these keys / values [Hkv, S, D] (rows contiguous, one head stride) for
    `rows` query rows per kv head."""
    dim = keys.shape[-1]
    return (
        keys.device.type == "cpu"
        and keys.dtype in KERNEL_DTYPES
        and values.dtype == keys.dtype
        and keys.stride() == values.stride()
        and keys.stride()[1:] == (dim, 1)
        and rows <= MAX_ROWS
        and dim <= MAX_DIM
        and dim % 8 == 0
        and load() is not None
    )


def range_attention(
    query: Tensor,  # [Hkv, R, D] fp32, multiplied by the softmax scaling
    keys: Tensor,  # [Hkv, T, D] bf16 or fp32, contiguous
    values: Tensor,  # [Hkv, T, D], same dtype
    starts: Tensor,  # [Q] int64
    ends: Tensor,  # [Q] int64
    range_offsets: Tensor,  # [Hkv+1] int64: kv head h owns ranges range_offsets[h]:range_offsets[h+1]
    row_mask: Tensor | None,  # [Q, R] bool, True = the row reads that range; None = every row reads every range
    round_probs: bool = False,  # round the probabilities that weigh the values to bf16, as torch's bf16 SDPA does
) -> tuple[Tensor, Tensor]:  # out [Hkv, R, D] fp32, lse [Hkv, R] fp32 (-inf and zeros for a row that read nothing)
    """Exact softmax attention of each row over the keys of its ranges, with its log-sum-exp."""
    library = load()
    assert library is not None, "range_attention called without the native library; check supports() first"
    num_kv_heads, rows, dim = query.shape
    assert keys.shape == values.shape and keys.dtype == values.dtype and keys.is_contiguous() and values.is_contiguous()
    assert keys.shape[0] == num_kv_heads and keys.shape[2] == dim and rows <= MAX_ROWS and dim <= MAX_DIM
    assert range_offsets.shape == (num_kv_heads + 1,) and starts.shape == ends.shape
    assert starts.dtype == ends.dtype == range_offsets.dtype == torch.int64
    query, starts, ends, range_offsets = (t.contiguous() for t in (query.float(), starts, ends, range_offsets))
    mask = None if row_mask is None else row_mask.contiguous()  # bool is one byte, 0 or 1: the kernel's uint8
    assert mask is None or (mask.dtype == torch.bool and mask.shape == (starts.shape[0], rows))
    out = torch.empty(num_kv_heads, rows, dim)
    lse = torch.empty(num_kv_heads, rows)
    status = library.range_attention(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), int(round_probs),
        starts.data_ptr(), ends.data_ptr(), range_offsets.data_ptr(), None if mask is None else mask.data_ptr(),
        num_kv_heads, rows, keys.shape[1], dim, out.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    assert status == 0, f"range_attention refused rows={rows} dim={dim}"
    return out, lse.masked_fill_(lse <= EMPTY_LSE / 2, -math.inf)


def select_ranges(
    logits: Tensor,  # [Hkv, G*N, C] fp32 centroid logits q.C_j * scaling, rows g*N + n
    thresholds: Tensor,  # [Hkv] fp32 thresholds on log S_j
    sizes: Tensor,  # [Hkv, C]; fp32 saves a conversion (ClusteredLayer.float_sizes)
    offsets: Tensor,  # [Hkv, C+1] int64
    pinned: Tensor | None,  # [Hkv, C] bool: clusters every query reads
    queries: int,  # N
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor, int, int]:
    """The threshold rule's ranges (see select_ranges in csrc/range_attention.c), ready for range_attention:
    starts [Q], ends [Q], range_offsets [Hkv+1], row_mask [Q, G*N] bool (None for one query), pinned [Q] bool
    (the range's cluster is pinned), clusters [Q] int64 (the range's cluster), keys read (the union over queries)
    and keys selected (summed over queries)."""
    library = load()
    assert library is not None, "select_ranges called without the native library; check supports() first"
    num_kv_heads, rows, num_clusters = logits.shape
    assert logits.dtype == torch.float32 and rows % queries == 0 and rows <= MAX_ROWS
    assert sizes.shape == (num_kv_heads, num_clusters) and offsets.shape == (num_kv_heads, num_clusters + 1)
    assert pinned is None or (pinned.dtype == torch.bool and pinned.shape == sizes.shape)
    logits, thresholds = logits.contiguous(), thresholds.float().clamp(-1e30, 1e30).contiguous()  # no infinities
    sizes, offsets = sizes.float().contiguous(), offsets.contiguous()
    pinned = None if pinned is None else pinned.contiguous()
    starts = torch.empty(num_kv_heads * num_clusters, dtype=torch.int64)
    ends = torch.empty_like(starts)
    range_offsets = torch.empty(num_kv_heads + 1, dtype=torch.int64)
    row_mask = None if queries == 1 else torch.empty(num_kv_heads * num_clusters, rows, dtype=torch.bool)
    range_pinned = torch.zeros(num_kv_heads * num_clusters, dtype=torch.bool)
    range_clusters = torch.empty(num_kv_heads * num_clusters, dtype=torch.int64)
    counts = torch.empty(2, dtype=torch.int64)
    count = library.select_ranges(
        logits.data_ptr(), thresholds.data_ptr(), sizes.data_ptr(), offsets.data_ptr(),
        None if pinned is None else pinned.data_ptr(), num_kv_heads, rows // queries, queries, num_clusters,
        starts.data_ptr(), ends.data_ptr(), range_offsets.data_ptr(), None if row_mask is None else row_mask.data_ptr(),
        range_pinned.data_ptr(), range_clusters.data_ptr(), counts.data_ptr(),
    )  # fmt: skip
    assert count >= 0, f"select_ranges refused {rows} rows"
    mask = None if row_mask is None else row_mask[:count]
    pinned_ranges, clusters = range_pinned[:count], range_clusters[:count]
    return starts[:count], ends[:count], range_offsets, mask, pinned_ranges, clusters, int(counts[0]), int(counts[1])


def rest_estimate(
    logits: Tensor,  # [Hkv, G*N, C] fp32 centroid logits q.C_j * scaling, rows g*N + n
    thresholds: Tensor,  # [Hkv] fp32 thresholds on log S_j
    sizes: Tensor,  # [Hkv, C]; fp32 saves a conversion (ClusteredLayer.float_sizes)
    pinned: Tensor | None,  # [Hkv, C] bool: clusters every query reads
    means: Tensor,  # [Hkv, C, D] bf16 or fp32: each cluster's mean value
    queries: int,  # N
    skip_below: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """The clusters each query does not read under the threshold rule of select_ranges, each as its N_j keys at
    the centroid logit holding the cluster's mean value (rest_estimate in csrc/range_attention.c): out [Hkv, G*N, D]
    fp32 and lse [Hkv, G*N] fp32 (-inf for a row that reads every cluster). skip_below as for weighted_means."""
    library = load()
    assert library is not None, "rest_estimate called without the native library; check supports() first"
    num_kv_heads, rows, num_clusters = logits.shape
    assert logits.dtype == torch.float32 and rows % queries == 0 and rows <= MAX_ROWS
    assert sizes.shape == (num_kv_heads, num_clusters) and (pinned is None or pinned.shape == sizes.shape)
    assert means.dtype in KERNEL_DTYPES and means.shape[:2] == sizes.shape and means.shape[2] <= MAX_DIM
    logits, thresholds = logits.contiguous(), thresholds.float().clamp(-1e30, 1e30).contiguous()  # no infinities
    sizes, means = sizes.float().contiguous(), means.contiguous()
    pinned = None if pinned is None else pinned.contiguous()
    out = torch.empty(num_kv_heads, rows, means.shape[2])
    lse = torch.empty(num_kv_heads, rows)
    status = library.rest_estimate(
        logits.data_ptr(), thresholds.data_ptr(), sizes.data_ptr(), None if pinned is None else pinned.data_ptr(),
        means.data_ptr(), int(means.dtype == torch.bfloat16), num_kv_heads, rows // queries, queries, num_clusters,
        means.shape[2], skip_below, out.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    if status == -2:
        raise MemoryError("rest_estimate could not allocate its scratch buffer")
    assert status == 0, f"rest_estimate refused rows={rows} dim={means.shape[2]}"
    return out, lse.masked_fill_(lse <= EMPTY_LSE / 2, -math.inf)


def refined_attention(
    query: Tensor,  # [Hkv, G*N, D] fp32, multiplied by the softmax scaling, rows g*N + n
    keys: Tensor,  # [Hkv, T, D] bf16 or fp32, contiguous
    values: Tensor,  # [Hkv, T, D], same dtype
    starts: Tensor,  # [Q] int64: the candidate ranges, as for range_attention
    ends: Tensor,  # [Q] int64
    range_offsets: Tensor,  # [Hkv+1] int64
    row_mask: Tensor | None,  # [Q, G*N] bool or None, as for range_attention
    pinned: Tensor | None,  # [Q] bool: ranges whose keys are always kept
    queries: int,  # N
    keep: int,  # keys each query keeps per kv head, besides the pinned ones it reads
    round_probs: bool = False,
    means: Tensor | None = None,  # [Hkv, C, D], the dtype of keys: each cluster's mean value
    clusters: Tensor | None = None,  # [Q] int64: each range's cluster (with means)
) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """Two-stage attention (refined_attention in csrc/range_attention.c): each query attends to the `keep`
    candidate keys with the highest logit over its group's heads, plus every pinned key it reads; with means, the
    candidates it drops count at their exact logit holding their cluster's mean value. Returns out [Hkv, G*N, D]
    fp32, lse [Hkv, G*N] fp32 (-inf for a row that read nothing) and the counts of keys whose K was read, keys
    whose V was read, and keys kept summed over queries."""
    library = load()
    assert library is not None, "refined_attention called without the native library; check supports() first"
    num_kv_heads, rows, dim = query.shape
    assert keys.shape == values.shape and keys.dtype == values.dtype and keys.is_contiguous() and values.is_contiguous()
    assert keys.shape[0] == num_kv_heads and keys.shape[2] == dim and rows <= MAX_ROWS and dim <= MAX_DIM
    assert range_offsets.shape == (num_kv_heads + 1,) and starts.shape == ends.shape and rows % queries == 0
    assert row_mask is None or (row_mask.dtype == torch.bool and row_mask.shape == (starts.shape[0], rows))
    assert pinned is None or (pinned.dtype == torch.bool and pinned.shape == starts.shape)
    query, starts, ends, range_offsets = (t.contiguous() for t in (query.float(), starts, ends, range_offsets))
    mask = None if row_mask is None else row_mask.contiguous()
    pinned = None if pinned is None else pinned.contiguous()
    assert (means is None) == (clusters is None)
    num_clusters = 0
    if means is not None:
        assert means.dtype == keys.dtype and means.is_contiguous() and means.shape[0] == num_kv_heads
        assert means.shape[2] == dim and clusters.dtype == torch.int64 and clusters.shape == starts.shape
        num_clusters, clusters = means.shape[1], clusters.contiguous()
    out = torch.empty(num_kv_heads, rows, dim)
    lse = torch.empty(num_kv_heads, rows)
    counts = torch.empty(3, dtype=torch.int64)
    status = library.refined_attention(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16), int(round_probs),
        starts.data_ptr(), ends.data_ptr(), range_offsets.data_ptr(), None if mask is None else mask.data_ptr(),
        None if pinned is None else pinned.data_ptr(), None if means is None else means.data_ptr(),
        None if clusters is None else clusters.data_ptr(), num_clusters, num_kv_heads, queries, rows, keys.shape[1],
        dim, keep,
        out.data_ptr(), lse.data_ptr(), counts.data_ptr(),
    )  # fmt: skip
    if status == -2:
        raise MemoryError("refined_attention could not allocate its scratch buffers")
    assert status == 0, f"refined_attention refused rows={rows} dim={dim} queries={queries}"
    lse = lse.masked_fill_(lse <= EMPTY_LSE / 2, -math.inf)
    return out, lse, (int(counts[0]), int(counts[1]), int(counts[2]))


def centroid_logits(query: Tensor, centroids: Tensor) -> Tensor:
    """query [Hkv, R, D] fp32 (scaled) . centroids [Hkv, C, D] bf16 or fp32 -> logits [Hkv, R, C] fp32."""
    library = load()
    assert library is not None, "centroid_logits called without the native library; check supports() first"
    num_kv_heads, rows, dim = query.shape
    assert centroids.dtype in KERNEL_DTYPES and centroids.is_contiguous() and centroids.shape[0] == num_kv_heads
    assert centroids.shape[2] == dim and dim <= MAX_DIM
    query = query.float().contiguous()
    logits = torch.empty(num_kv_heads, rows, centroids.shape[1])
    library.centroid_logits(
        query.data_ptr(), centroids.data_ptr(), int(centroids.dtype == torch.bfloat16), num_kv_heads, rows,
        centroids.shape[1], dim, logits.data_ptr(),
    )  # fmt: skip
    return logits


def weighted_means(weights: Tensor, means: Tensor, skip_below: float = 1e-8) -> Tensor:
    """weights [Hkv, R, C] fp32 @ means [Hkv, C, D] bf16 or fp32 -> [Hkv, R, D] fp32.

    A cluster weighing less than skip_below in every row is not read (its means are most of the bytes); with
    weights summing to 1 per row that moves each output by at most C * skip_below times the largest mean.
    """
    library = load()
    assert library is not None, "weighted_means called without the native library; check supports() first"
    num_kv_heads, rows, num_clusters = weights.shape
    assert means.dtype in KERNEL_DTYPES and means.is_contiguous() and means.shape[:2] == (num_kv_heads, num_clusters)
    assert means.shape[2] <= MAX_DIM
    weights = weights.float().contiguous()
    out = torch.empty(num_kv_heads, rows, means.shape[2])
    library.weighted_means(
        weights.data_ptr(), means.data_ptr(), int(means.dtype == torch.bfloat16), num_kv_heads, rows, num_clusters,
        means.shape[2], skip_below, out.data_ptr(),
    )  # fmt: skip
    return out


def value_pairs_supported() -> bool:
    """Whether cache_attention weighs bf16 values two keys per vdpbf16ps here (same sums as FMAs, half the
    instructions): the CPU has AVX512-BF16 and its pairs add in order."""
    library = load()
    return library is not None and bool(library.value_pairs_supported())


def cache_attention(
    query: Tensor,  # [Hkv, G*N, D], rows g*N + n (converted to the dtype of keys)
    scaling: float,
    keys: Tensor,  # [Hkv, S, D] bf16 or fp32, rows contiguous (a view of a preallocated cache is fine)
    values: Tensor,  # [Hkv, S, D], same dtype and strides
    mask: Tensor | None,  # [N, S] bool, True = query n sees key t; None = every query sees every key
    queries: int,  # N
    round_probs: bool = False,
    value_pairs: bool = True,  # False: weigh the values by FMAs even where bf16 pairs sum the same (for tests)
) -> Tensor:  # [Hkv, G*N, D] fp32
    """Exact attention of a few rows over a whole cache (cache_attention in csrc/range_attention.c). A row's bits
    depend only on the keys it sees, in cache order: a tree node gets exactly what the decode step of its path gets."""
    library = load()
    assert library is not None, "cache_attention called without the native library; check supports() first"
    num_kv_heads, rows, dim = query.shape
    length = keys.shape[1]
    assert keys.shape == values.shape == (num_kv_heads, length, dim) and keys.dtype == values.dtype
    assert keys.dtype in KERNEL_DTYPES and keys.stride() == values.stride() and keys.stride()[1:] == (dim, 1)
    assert rows % queries == 0 and rows <= MAX_ROWS and dim <= MAX_DIM and dim % 8 == 0
    assert mask is None or (mask.dtype == torch.bool and mask.shape == (queries, length))
    query = query.to(keys.dtype).contiguous()
    mask = None if mask is None else mask.contiguous()
    out = torch.empty(num_kv_heads, rows, dim)
    status = library.cache_attention(
        query.data_ptr(), scaling, keys.data_ptr(), values.data_ptr(), int(keys.dtype == torch.bfloat16),
        int(round_probs), int(value_pairs), keys.stride(0), num_kv_heads, rows, queries, length, dim,
        None if mask is None else mask.data_ptr(), length, out.data_ptr(),
    )  # fmt: skip
    if status == -2:
        raise MemoryError("cache_attention could not allocate its scratch buffers")
    assert status == 0, f"cache_attention refused rows={rows} dim={dim} queries={queries}"
    return out
