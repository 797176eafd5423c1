"""K-means clustering of one layer's document keys into a cluster-ordered KV layout.

At ingest, for every layer and KV head, the document's keys (after RoPE) are L2-normalised and
clustered with k-means on their directions; keys and values are then stored reordered by cluster so that one
cluster is one contiguous slice, which is what lets squeezed attention read fewer keys (DESIGN 4.5).

Shapes: Hkv kv heads, T document tokens, C clusters, Cc coarse clusters, D head dim.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

# Elements of the [Hkv, chunk, C] similarity block of one torch assignment step. One CPU thread: 2^21
# 0.27 s, 2^25 0.49 s per step at T=32K, C=1638; a GPU wants large blocks.
_CPU_BLOCK_ELEMENTS = 1 << 21
_GPU_BLOCK_ELEMENTS = 1 << 27
_SIMILARITY_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ClusterConfig:
    """How many clusters to make and how to run k-means.

    fraction: clusters per document token (Squeezed Attention uses about 5%).
    min_clusters / max_clusters: bounds on the cluster count (never more than the tokens).
    iterations: at most this many Lloyd iterations (both backends stop early once no point moves).
    settle_fraction: the torch backend also stops once fewer than this fraction of the points changed
        cluster in an iteration (the last few iterations move a handful of boundary keys each).
    seed: seed of the initial centroids, so ingest is reproducible.
    coarse_fraction: None for one level; otherwise coarse clusters per fine cluster, e.g. 0.05,
        building a second level for hierarchical lookup.
    backend: "torch", spherical Lloyd's on all heads at once on the keys' device with bf16 similarity
        blocks (measured fastest on this CPU, see `kmeans`, and the one for a GPU); "sklearn",
        scikit-learn's fp32 Lloyd KMeans per kv head.
    two_level_from: with the torch backend, from this many clusters on, k-means first splits the keys
        into about sqrt(C) groups and then each group into its share of the C clusters: per iteration
        T * 2 sqrt(C) similarities instead of T * C (at 128K, C = 6554: 162 instead of 6554 per key).
        None: always one flat k-means.
    recent_tokens: the document's last R positions are not clustered but form one cluster of their own
        (the whole document when it is no longer), so a reader can take that window whole: decode queries
        attend to their neighbourhood by position more than by direction (see rapid.squeeze.RECENT_TOKENS).
    """

    fraction: float = 0.05
    min_clusters: int = 16
    max_clusters: int = 16384
    iterations: int = 10
    settle_fraction: float = 0.005
    seed: int = 0
    coarse_fraction: float | None = None
    backend: Literal["sklearn", "torch"] = "torch"
    two_level_from: int | None = 256
    recent_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 1 <= self.min_clusters <= self.max_clusters:
            raise ValueError(f"need 1 <= min_clusters <= max_clusters, got {self.min_clusters}, {self.max_clusters}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 0.0 <= self.settle_fraction < 1.0:
            raise ValueError(f"settle_fraction must be in [0, 1), got {self.settle_fraction}")
        if self.coarse_fraction is not None and not 0.0 < self.coarse_fraction < 1.0:
            raise ValueError(f"coarse_fraction must be in (0, 1) or None, got {self.coarse_fraction}")
        if self.backend not in ("sklearn", "torch"):
            raise ValueError(f"backend must be 'sklearn' or 'torch', got {self.backend!r}")
        if self.recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {self.recent_tokens}")

    def num_clusters(self, num_tokens: int) -> int:
        """Fine cluster count for a document of `num_tokens` tokens."""
        wanted = round(self.fraction * num_tokens)
        return min(num_tokens, max(self.min_clusters, min(self.max_clusters, wanted)))

    def num_coarse_clusters(self, num_clusters: int) -> int:
        assert self.coarse_fraction is not None
        return max(1, min(num_clusters, round(self.coarse_fraction * num_clusters)))


@dataclass(frozen=True)
class CoarseLevel:
    """Coarse centroids over the fine clusters, for hierarchical lookup.

    Fine clusters are numbered so that each coarse cluster owns a contiguous range of them, and so
    (since keys follow the fine order) a contiguous slice of keys as well.
    """

    centroids: Tensor  # [Hkv, Cc, D] fp32, mean of the raw keys of all member clusters
    sizes: Tensor  # [Hkv, Cc] int64, keys per coarse cluster
    offsets: Tensor  # [Hkv, Cc+1] int64, fine clusters offsets[g]:offsets[g+1] belong to coarse g

    def fine_to_coarse(self) -> Tensor:
        """[Hkv, C] int64: the coarse cluster of every fine cluster."""
        num_fine = int(self.offsets[0, -1])
        fine = torch.arange(num_fine, device=self.offsets.device).expand(self.offsets.shape[0], -1)
        return torch.searchsorted(self.offsets[:, 1:].contiguous(), fine.contiguous(), right=True)


@dataclass(frozen=True)
class ClusteredLayer:
    """One layer's document keys and values, clustered and stored in cluster order.

    Centroids are the plain (unnormalised) mean of each cluster's raw keys: q.C_j is then exactly the
    mean logit of the cluster's keys, which is what the estimated attention weight
    S_j = exp(q.C_j/sqrt(d)) / sum_i N_i exp(q.C_i/sqrt(d)) of DESIGN 4.5 wants. key_variances (per
    dimension, of the raw keys) let scoring add the spread of a cluster's logits (kvcache.selection's
    VARIANCE_WEIGHT). The normalised keys are used only to form the clusters. Empty clusters have a zero
    centroid and size 0; scoring gives them weight zero. value_means are the plain means of each cluster's
    values: with the centroid logits they estimate what the clusters a query does not read contribute.

    Example with T=5, C=3, one head: assignments [2, 0, 2, 0, 0] give
    permutation [1, 3, 4, 0, 2], sizes [3, 0, 2], offsets [0, 3, 3, 5];
    keys[h, i] == original_keys[h, permutation[h, i]], and cluster c is keys[h, offsets[c]:offsets[c+1]].
    """

    keys: Tensor  # [Hkv, T, D] in cluster order, dtype of the cache
    values: Tensor  # [Hkv, T, D] in cluster order
    centroids: Tensor  # [Hkv, C, D] fp32
    value_means: Tensor  # [Hkv, C, D] fp32, mean of each cluster's values (to estimate the clusters not read)
    key_variances: Tensor  # [Hkv, C, D] fp32, variance of each cluster's raw keys per dimension
    sizes: Tensor  # [Hkv, C] int64
    offsets: Tensor  # [Hkv, C+1] int64
    permutation: Tensor  # [Hkv, T] int64, original token position of each stored key
    coarse: CoarseLevel | None = None

    @functools.cached_property
    def centroids_by_dim(self) -> Tensor:
        """[Hkv, D, C] fp32 contiguous: scoring a few queries reads it 2-3x faster than `centroids` (measured:
        0.23 against 0.67 ms per einsum at 128K tokens; a transposed view copies or strides)."""
        return self.centroids.transpose(1, 2).contiguous()

    @functools.cached_property
    def compact_centroids(self) -> Tensor:
        """Centroids in bf16 when the cache is bf16 (half the bytes for the native scoring pass), else fp32."""
        dtype = torch.bfloat16 if self.keys.dtype == torch.bfloat16 else torch.float32
        return self.centroids.to(dtype).contiguous()

    @functools.cached_property
    def variances_by_dim(self) -> Tensor:
        """[Hkv, D, C] fp32 contiguous, as centroids_by_dim."""
        return self.key_variances.transpose(1, 2).contiguous()

    @functools.cached_property
    def compact_scoring(self) -> Tensor:
        """[Hkv, C, 2D]: each centroid followed by its key variances, in the dtype of compact_centroids, so the native
        pass scores both terms of the cluster logit in one read (one dot of 2D per cluster, not two of D)."""
        return torch.cat([self.centroids, self.key_variances], dim=2).to(self.compact_centroids.dtype).contiguous()

    @functools.cached_property
    def compact_value_means(self) -> Tensor:
        """value_means in bf16 when the cache is bf16 (for the native rest estimate), else fp32."""
        return self.value_means.to(self.compact_centroids.dtype).contiguous()

    @functools.cached_property
    def float_sizes(self) -> Tensor:
        """[Hkv, C] fp32 N_j, as the native selection reads them (exact below 2**24 keys per cluster)."""
        return self.sizes.float()

    @functools.cached_property
    def log_sizes(self) -> Tensor:
        """[Hkv, C] fp32 log N_j; -inf for an empty cluster, so it weighs nothing in any sum."""
        return torch.log(self.sizes.float())

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    def original_order(self) -> tuple[Tensor, Tensor]:
        """Keys and values back in document order, [Hkv, T, D] each (bit-exact)."""
        inverse = torch.argsort(self.permutation, dim=1)[..., None].expand_as(self.keys)
        return self.keys.gather(1, inverse), self.values.gather(1, inverse)


def ranges_to_indices(offsets: Tensor, selected: Tensor) -> Tensor:
    """Concatenate the index ranges offsets[c]:offsets[c+1] of the selected clusters.

    offsets [C+1] int64, selected [C] bool -> [M] int64 with M = total size of the selected ranges.

    Example: offsets [0, 3, 5, 9], selected [True, False, True] -> [0, 1, 2, 5, 6, 7, 8].
    """
    starts = offsets[:-1][selected]
    lengths = (offsets[1:] - offsets[:-1])[selected]
    # Position i of the output lies in range r: index = i - (sum of earlier lengths) + starts[r].
    shift = starts - (torch.cumsum(lengths, 0) - lengths)
    return torch.arange(int(lengths.sum()), device=offsets.device) + torch.repeat_interleave(shift, lengths)


def cluster_layer(keys: Tensor, values: Tensor, config: ClusterConfig) -> ClusteredLayer:
    """Cluster one layer's document keys per KV head and reorder keys and values by cluster.

    keys, values [Hkv, T, D] (keys after RoPE), any float dtype; the result keeps their dtype. With
    config.recent_tokens = R, k-means clusters the first T - R keys and the last R form one more cluster.
    """
    assert keys.dim() == 3 and keys.shape == values.shape, f"{keys.shape} vs {values.shape}"
    num_heads, num_tokens, _ = keys.shape
    clustered = num_tokens - min(config.recent_tokens, num_tokens)  # keys before the recent window
    num_clusters, assignments = 0, torch.empty(num_heads, 0, dtype=torch.int64, device=keys.device)
    if clustered:
        num_clusters = config.num_clusters(clustered)
        assignments = kmeans(keys[:, :clustered], num_clusters, config)  # [Hkv, T - R]
    if clustered < num_tokens:  # the window is cluster number C
        window = torch.full((num_heads, num_tokens - clustered), num_clusters, device=keys.device)
        assignments = torch.cat([assignments, window], dim=1)
        num_clusters += 1
    if config.coarse_fraction is None:
        return layer_from_assignments(keys, values, assignments, num_clusters)
    fine_centroids = _cluster_means(keys.float(), assignments, num_clusters)  # [Hkv, C, D]
    num_coarse = config.num_coarse_clusters(num_clusters)
    coarse_assignments = kmeans(fine_centroids, num_coarse, config)
    return layer_from_assignments(keys, values, assignments, num_clusters, (coarse_assignments, num_coarse))


def layer_from_assignments(
    keys: Tensor,  # [Hkv, T, D]
    values: Tensor,  # [Hkv, T, D]
    assignments: Tensor,  # [Hkv, T] int64 cluster of every token
    num_clusters: int,
    coarse: tuple[Tensor, int] | None = None,  # ([Hkv, C] coarse cluster of every fine cluster, Cc)
) -> ClusteredLayer:
    """Lay keys and values out in cluster order (see the ClusteredLayer example).

    With a coarse level, fine clusters are first renumbered in coarse order (stable), so each
    coarse cluster owns a contiguous range of fine clusters.
    """
    num_heads, num_tokens, head_dim = keys.shape
    raw = keys.float()
    coarse_level = None
    if coarse is not None:
        fine_to_coarse, num_coarse = coarse
        old_ids = torch.sort(fine_to_coarse, dim=1, stable=True).indices  # [Hkv, C] new id -> old id
        assignments = torch.argsort(old_ids, dim=1).gather(1, assignments)
        fine_to_coarse = fine_to_coarse.gather(1, old_ids)  # [Hkv, C] in the new numbering
        token_coarse = fine_to_coarse.gather(1, assignments)  # [Hkv, T]
        coarse_level = CoarseLevel(
            centroids=_cluster_means(raw, token_coarse, num_coarse),
            sizes=_counts(token_coarse, num_coarse),
            offsets=F.pad(torch.cumsum(_counts(fine_to_coarse, num_coarse), 1), (1, 0)),
        )
    permutation = torch.sort(assignments, dim=1, stable=True).indices  # [Hkv, T]
    gather = permutation[..., None].expand(num_heads, num_tokens, head_dim)
    sizes = _counts(assignments, num_clusters)
    centroids = _cluster_means(raw, assignments, num_clusters)
    return ClusteredLayer(
        keys=keys.gather(1, gather),
        values=values.gather(1, gather),
        centroids=centroids,
        value_means=_cluster_means(values.float(), assignments, num_clusters),
        key_variances=(_cluster_means(raw * raw, assignments, num_clusters) - centroids * centroids).clamp_(min=0),
        sizes=sizes,
        offsets=F.pad(torch.cumsum(sizes, 1), (1, 0)),
        permutation=permutation,
        coarse=coarse_level,
    )


def kmeans(points: Tensor, num_clusters: int, config: ClusterConfig) -> Tensor:
    """Cluster the directions of points [Hkv, T, D], per head -> assignments [Hkv, T] int64.

    Points are L2-normalised first. Both backends start from distinct random points (seeded),
    stop early once no assignment changes, and may leave a cluster empty (handled downstream).

    Measured on this 2-core Xeon (shared with other jobs), synthetic keys Hkv=3, D=64, C=5% of T,
    10 iterations, random init, seconds (the mean cosine of a key to its cluster agrees to 0.001):
      threads  keys                       backend     T=32K      T=64K      T=128K
      1        gaussian (no convergence)  sklearn     7.2        18.2       68.3
                                          torch fp32  6.2-7.2    14.0       66.7
      1        1024 blobs (converge ~7)   sklearn     3.3-3.6    22.6-28.5
                                          torch fp32  3.6-5.9    16.4-31.4
      2        gaussian                   sklearn     4.3-4.4
                                          torch fp32  14.9-15.0
    With bf16 similarity blocks (the torch backend now), gaussian, 1 thread, beside another busy job:
    torch 3.0 s vs sklearn 5.3 s at 32K, torch 11.0 s at 64K and 66 s at 128K (3 iterations: 19 s; bf16 matmul
    is ~6x cheaper than fp32; the max over each block is half of what is left, and suffers most from a
    neighbour's memory traffic). At T=32K, 1 thread, faiss.Kmeans(spherical=True) took 13-19 s and
    MiniBatchKMeans 11-13 s (leaving 67 clusters empty). With two threads torch's many small parallel
    matmuls stall whenever a core is busy elsewhere, so we run one (RAPID_THREADS).
    Two-level (`two_level_from`, the default from 256 clusters): 6.4 s instead of 66 s at 128K
    (gaussian, same conditions); on the real keys of the default model's first 4 layers at 16K, 2.1 s
    instead of 6.9 s, and a 10% budget kept the same attention mass per layer (within 0.01).
    Flat k-means on the full default model at 16K (819 clusters, 30 layers) took 28 s, 40% of its 76 s
    prefill: hence the two-level default from 256 clusters.
    """
    num_heads, num_points, _ = points.shape
    assert 1 <= num_clusters <= num_points, f"{num_clusters} clusters for {num_points} points"
    points = F.normalize(points.float(), dim=-1)
    if config.backend == "torch":
        if config.two_level_from is not None and num_clusters >= config.two_level_from:
            return _two_level_kmeans(points, num_clusters, config)
        return _torch_kmeans(points, num_clusters, config.iterations, config.seed, config.settle_fraction)
    labels = []
    for head in points.cpu().numpy():
        estimator = KMeans(
            num_clusters, init="random", n_init=1, max_iter=config.iterations, tol=0.0, random_state=config.seed
        )
        with warnings.catch_warnings():  # "fewer distinct clusters than asked": empty clusters are fine
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels.append(estimator.fit(head).labels_)
    return torch.from_numpy(np.stack(labels).astype(np.int64)).to(points.device)


def _torch_kmeans(points: Tensor, num_clusters: int, iterations: int, seed: int, settle_fraction: float) -> Tensor:
    """Spherical Lloyd's on all heads at once: unit points [Hkv, T, D] -> [Hkv, T] int64.

    Assignment by highest cosine, centroids are normalised means; a cluster that runs empty is
    re-seeded with the point that fits its centroid worst.
    """
    num_heads, num_points, head_dim = points.shape
    generator = torch.Generator().manual_seed(seed)
    init = torch.stack([torch.randperm(num_points, generator=generator)[:num_clusters] for _ in range(num_heads)])
    centroids = points.gather(1, init.to(points.device)[..., None].expand(-1, -1, head_dim))  # [Hkv, C, D]
    assignments, similarity = _assign(points, centroids)
    for _ in range(iterations):
        sums = _cluster_sums(points, assignments, num_clusters)  # [Hkv, C, D]
        counts = _counts(assignments, num_clusters)
        for head in range(num_heads):
            empty = torch.nonzero(counts[head] == 0).squeeze(1)
            if len(empty):
                worst = torch.topk(similarity[head], len(empty), largest=False).indices
                sums[head, empty] = points[head, worst]
        previous = assignments
        assignments, similarity = _assign(points, F.normalize(sums, dim=-1))
        if int((assignments != previous).sum()) <= settle_fraction * assignments.numel():
            break
    return assignments


def _two_level_kmeans(points: Tensor, num_clusters: int, config: ClusterConfig) -> Tensor:
    """k-means into about sqrt(C) groups, then each group into its share of the C clusters.

    unit points [Hkv, T, D] -> [Hkv, T] int64 in [0, C); a group's clusters get consecutive ids.
    """
    num_heads, num_points, _ = points.shape
    num_groups = max(2, round(math.sqrt(num_clusters)))
    settle = config.settle_fraction
    groups = _torch_kmeans(points, num_groups, config.iterations, config.seed, settle)  # [Hkv, T]
    labels = torch.empty_like(groups)
    for head in range(num_heads):
        order = torch.argsort(groups[head], stable=True)
        counts = torch.bincount(groups[head], minlength=num_groups)
        shares = cluster_shares(counts, num_clusters)
        bounds = F.pad(torch.cumsum(counts, 0), (1, 0)).tolist()
        first_ids = F.pad(torch.cumsum(shares, 0), (1, 0)).tolist()
        for group, share in enumerate(shares.tolist()):
            if share == 0:
                continue
            members = order[bounds[group] : bounds[group + 1]]
            local = torch.zeros(len(members), dtype=torch.int64, device=points.device)
            if share > 1:
                seed = config.seed + 1 + group
                local = _torch_kmeans(points[head, members][None], share, config.iterations, seed, settle)[0]
            labels[head, members] = local + first_ids[group]
    return labels


def cluster_shares(counts: Tensor, total: int) -> Tensor:
    """Split `total` clusters over groups of `counts` points, in proportion to their sizes.

    Every non-empty group gets between 1 and its count; the shares sum to `total` (<= counts.sum(),
    >= the number of non-empty groups). Largest remainders break the rounding.

    Example: counts [6, 3, 0, 1], total 5: exact shares 3, 1.5, 0, 0.5 -> [3, 1, 0, 1].
    """
    exact = counts.double() * total / counts.sum()
    shares = torch.minimum(exact.floor().long().clamp(min=1), counts).masked_fill(counts == 0, 0)
    while (missing := total - int(shares.sum())) != 0:
        if missing > 0:  # give one more to the groups furthest below their exact share, with room left
            gap = (exact - shares).masked_fill(shares >= counts, -math.inf)
            shares[torch.topk(gap, min(missing, int((shares < counts).sum()))).indices] += 1
        else:  # the floor of 1 overshot: take one from the groups furthest above their exact share
            excess = (shares - exact).masked_fill(shares <= 1, -math.inf)
            shares[torch.topk(excess, min(-missing, int((shares > 1).sum()))).indices] -= 1
    return shares


def _assign(points: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid by cosine, in blocks of tokens. -> assignments [Hkv, T], similarity [Hkv, T].

    points [Hkv, T, D] and centroids [Hkv, C, D] unit vectors; the similarity blocks are bf16 (AMX on
    this CPU, tensor cores on a GPU): a bf16 cosine is off by ~1e-3, which only moves points that lie
    on a boundary between two nearly equal centroids.
    """
    num_heads, num_points, _ = points.shape
    block = _CPU_BLOCK_ELEMENTS if points.device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    chunk = max(64, block // (num_heads * centroids.shape[1]) // 64 * 64)  # whole AMX tiles
    best = torch.empty(num_heads, num_points, dtype=_SIMILARITY_DTYPE, device=points.device)
    assignments = torch.empty(num_heads, num_points, dtype=torch.int64, device=points.device)
    points = points.to(_SIMILARITY_DTYPE)
    centroids_t = centroids.to(_SIMILARITY_DTYPE).transpose(1, 2).contiguous()  # [Hkv, D, C]
    for start in range(0, num_points, chunk):
        block = torch.bmm(points[:, start : start + chunk], centroids_t)  # [Hkv, chunk, C]
        torch.max(block, dim=-1, out=(best[:, start : start + chunk], assignments[:, start : start + chunk]))
    return assignments, best


def _counts(assignments: Tensor, num_clusters: int) -> Tensor:
    """[Hkv, T] cluster ids -> [Hkv, C] int64 counts."""
    num_heads = assignments.shape[0]
    flat = assignments + torch.arange(num_heads, device=assignments.device)[:, None] * num_clusters
    return torch.bincount(flat.flatten(), minlength=num_heads * num_clusters).view(num_heads, num_clusters)


def _cluster_sums(points: Tensor, assignments: Tensor, num_clusters: int) -> Tensor:
    """[Hkv, T, D] points, [Hkv, T] ids -> [Hkv, C, D] fp32 sums."""
    num_heads, _, head_dim = points.shape
    flat = assignments + torch.arange(num_heads, device=assignments.device)[:, None] * num_clusters
    sums = torch.zeros(num_heads * num_clusters, head_dim, device=points.device)
    sums.index_add_(0, flat.flatten(), points.flatten(0, 1).float())
    return sums.view(num_heads, num_clusters, head_dim)


def _cluster_means(points: Tensor, assignments: Tensor, num_clusters: int) -> Tensor:
    """Mean of each cluster's points, [Hkv, C, D] fp32; zero for an empty cluster."""
    counts = _counts(assignments, num_clusters).clamp(min=1)
    return _cluster_sums(points, assignments, num_clusters) / counts[..., None]
