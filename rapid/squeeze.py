"""Squeezed document caches: the target's document KV clustered once, read through centroids.

`squeeze_document` prefills the document densely, records the queries of its last W positions (the
stand-in queries for threshold calibration), clusters every layer's keys (after RoPE) and calibrates
per-layer thresholds. The result replaces the dense document KV: a tail `KVCache` with
`document=SqueezedDocument` holds the question, the answer and the trees, and attention merges the
selected document clusters with that tail (kvcache.squeezed_attention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from kvcache.calibration import DEFAULT_BUDGETS, calibrate_rest, calibrate_thresholds
from kvcache.clustering import ClusterConfig, ClusteredLayer, cluster_layer
from kvcache.selection import SelectionRule, TopBudgetRule
from kvcache.squeezed import SqueezeStats, full_document_attention, squeezed_attention
from kvcache.store import ClusteredCache, PrefillCheckpoints
from rapid.cache import KVCache

SINK_TOKENS = 32  # the first tokens (template head) draw large attention from every query: always read
# The first layers attend broadly: on the default model at 8K, a 10% budget kept 50%, 79% and 85% of the
# attention mass in layers 0-2 and 87-99% (mostly ~97%) in layers 3-29. Those two read every key, as in Quest.
DENSE_LAYERS = 2
# Unread clusters can still count, each as its keys at the centroid's logit holding the cluster's mean value
# (kvcache.squeezed_attention's estimate_rest). It pays where every layer is squeezed and costs where few are:
# sessions 9-11 (README), at 10-12.5% of the keys, `default/4` at 128K with every layer squeezed rose about
# 97 -> 99% top-1 agreement, while the full model at 32K with 2 dense layers fell by 0.5-3.5 points, and the
# estimate slows one layer's attention by 10-20%. "calibrated" estimates only in the layers where it brought the
# calibration queries' attention output closer to dense (kvcache.calibrate_rest), per budget.
Rest = Literal["ignore", "estimate", "calibrated"]
REST: Rest = "calibrated"  # the default with the threshold rule; the "top" rule's budgets are not calibrated: "ignore"
# Decode queries attend to the document's last positions by position more than by direction, and k-means spreads
# those keys over clusters that are read or skipped by direction. So the last R positions are one cluster of their
# own (ClusterConfig.recent_tokens), always read like the sinks, inside the budget. On `default/4` at 128K
# (`eval.bench_kvcache --plan default/4:131072 --dense-layers 2 0 --rest ignore`, 10% of the keys, 256 steps),
# R = 0 -> 1024 moved top-1 agreement from 97.7 to 98.0% and the max logit difference from 9.0 to 1.6 with 2 dense
# layers, and agreement from 93.4 to 94.9% with none. A throwaway script that read the window on top of the 10%
# measured 98.8 / 94.5%; R = 2048 the same as 1024, R = 4096 less (98.0%).
RECENT_TOKENS = 1024
# Two stages (kvcache.squeezed_attention's keep_fraction): the clusters within `budget` are candidates, and each query
# attends to its keep_fraction of the document keys with the highest q.k among them (the dropped candidates at their
# cluster's mean value). None reads whole clusters. On `default/4` at 128K with every layer squeezed and the rest
# estimated (`eval.bench_kvcache --plan default/4:131072 --budgets 0.1 0.2 0.3 --dense-layers 0 --rest ignore
# estimate --keep-fractions none 0.1`), 30% refined to 10% gave 99.2% top-1 agreement reading 19.7% of the KV, and
# 30% of whole clusters 99.6% reading 29.4%, at about the same speed (a 1.8x step; the candidates' keys are still
# read), against 94.5% and a 2.6x step at 10%. Refining 20% to 10% rose 96.9 -> 98.4%. Speed first: off.
KEEP_FRACTION = None
# The fraction of the document keys a query reads. Session 12 (README), `rest` calibrated: `default/4` at 128K with
# every layer squeezed reached 99% top-1 agreement at 12.5% and not at 10%, and the full model at 32K with 2 dense
# layers agreed 97.5% at 12.5% against 95.9% at 10%, for a step 2.35x against 2.47x faster than dense.
BUDGET = 0.125


@dataclass(frozen=True)
class SqueezeConfig:
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(recent_tokens=RECENT_TOKENS))
    budget: float = BUDGET  # fraction of the document keys a query reads (one of `budgets`, or any for "top")
    budgets: tuple[float, ...] = DEFAULT_BUDGETS  # calibrated and stored
    rule: Literal["threshold", "top"] = "threshold"
    calibration_window: int = 256  # the last W document positions serve as stand-in queries
    sink_tokens: int = SINK_TOKENS  # clusters holding the first positions are always read
    dense_layers: int = DENSE_LAYERS  # the first layers attend to every document key (see DENSE_LAYERS)
    rest: Rest | None = None  # the unread clusters: ignored, estimated by centroid and mean value, or as calibrated;
    # None: the rule's default (default_rest)
    keep_fraction: float | None = KEEP_FRACTION  # refine the budget's clusters to single keys (see KEEP_FRACTION)

    def __post_init__(self) -> None:
        if self.rule == "threshold" and self.budget not in self.budgets:
            raise ValueError(f"budget {self.budget} must be one of the calibrated budgets {self.budgets}")
        _checked_rest(self.rest, self.rule)
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.calibration_window < 1:
            raise ValueError("calibration_window must be >= 1")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        _check_keep_fraction(self.keep_fraction, self.budget)

    @property
    def rest_mode(self) -> Rest:
        """`rest`, or the rule's default where it is None."""
        return _checked_rest(self.rest, self.rule)


def _check_keep_fraction(keep_fraction: float | None, budget: float) -> None:
    if keep_fraction is not None and not 0 < keep_fraction <= budget:
        raise ValueError(f"keep_fraction must be in (0, budget={budget}], got {keep_fraction}")


REST_CHOICES: tuple[Rest, ...] = get_args(Rest)


class QueryRecorder:
    """Keeps each layer's attention queries [H, W, D] (after RoPE) from the forwards it is passed to."""

    def __init__(self) -> None:
        self.queries: dict[int, torch.Tensor] = {}

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        self.queries[layer_idx] = query[0].detach().float().clone()


@dataclass
class SqueezedDocument:
    clustered: ClusteredCache
    rules: list[SelectionRule]
    num_tokens: int
    stats: SqueezeStats = field(default_factory=SqueezeStats)
    cluster_seconds: float = 0.0
    calibrate_seconds: float = 0.0
    resumed_tokens: int = 0  # prefill positions restored from checkpoints instead of computed
    sink_tokens: int = SINK_TOKENS
    recent_tokens: int = 0  # the clustering's recent window (ClusterConfig.recent_tokens), read whole
    dense_layers: int = DENSE_LAYERS
    estimate_rest: tuple[bool, ...] = ()  # per layer: count the unread clusters (see rests_for); () = no layer
    keep_fraction: float | None = KEEP_FRACTION

    def __post_init__(self) -> None:
        self.estimate_rest = self.estimate_rest or (False,) * len(self.clustered.layers)
        # per layer [Hkv, C]: the clusters holding one of the first `sink_tokens` or last `recent_tokens` positions
        self.always_read = [pinned_clusters(layer, self.sink_tokens, self.recent_tokens)
                            for layer in self.clustered.layers]

    @classmethod
    def for_config(cls, clustered: ClusteredCache, num_tokens: int, config: SqueezeConfig,
                   rules: list[SelectionRule] | None = None, **timings) -> SqueezedDocument:
        """A clustered cache read as `config` says (rules: precomputed for config's budget and rule).
        timings: cluster_seconds, calibrate_seconds, resumed_tokens."""
        rules = rules_for(clustered, config.budget, config.rule) if rules is None else rules
        return cls(clustered, rules, num_tokens, sink_tokens=config.sink_tokens,
                   recent_tokens=config.cluster.recent_tokens, dense_layers=config.dense_layers,
                   estimate_rest=rests_for(clustered, config.budget, config.rest_mode),
                   keep_fraction=config.keep_fraction, **timings)

    def attend(self, layer_idx: int, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor,
               tail_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        if layer_idx < self.dense_layers:
            return full_document_attention(query, self.clustered.layers[layer_idx], tail_keys, tail_values, tail_mask,
                                           scaling, self.stats)
        return squeezed_attention(query, self.clustered.layers[layer_idx], self.rules[layer_idx], tail_keys,
                                  tail_values, tail_mask, scaling, self.stats, self.always_read[layer_idx],
                                  self.estimate_rest[layer_idx], self.keep_fraction)

    def with_budget(self, budget: float, rule: Literal["threshold", "top"] = "threshold",
                    dense_layers: int | None = None, rest: Rest | None = None,
                    keep_fraction: float | None = None) -> SqueezedDocument:
        """The same clusters read under another budget (a calibrated one for "threshold"), and optionally
        another count of dense first layers, another choice about the unread clusters (rest; None: the rule's
        default), or single keys refined out of the budget's clusters (keep_fraction; None reads them whole)."""
        dense_layers = self.dense_layers if dense_layers is None else dense_layers
        _check_keep_fraction(keep_fraction, budget)
        rest = _checked_rest(rest, rule)
        return SqueezedDocument(self.clustered, rules_for(self.clustered, budget, rule), self.num_tokens,
                                sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                                dense_layers=dense_layers, estimate_rest=rests_for(self.clustered, budget, rest),
                                keep_fraction=keep_fraction)


def pinned_clusters(layer: ClusteredLayer, sink_tokens: int, recent_tokens: int = 0) -> torch.Tensor:
    """[Hkv, C] bool: clusters that hold any of the document's first `sink_tokens` or last `recent_tokens`
    positions.

    Example: permutation [[1, 3, 4, 0, 2]] with offsets [[0, 3, 3, 5]] and sink_tokens 1: position 0 is
    stored at row 3, which is in cluster 2, so the result is [[False, False, True]]; with recent_tokens 1
    as well, position 4 (row 2, cluster 0) adds cluster 0: [[True, False, True]].
    """
    out = torch.zeros(layer.sizes.shape, dtype=torch.bool)
    first_recent = layer.num_tokens - recent_tokens
    for head in range(out.shape[0]):
        positions = layer.permutation[head]
        rows = torch.nonzero((positions < sink_tokens) | (positions >= first_recent)).squeeze(1)
        out[head, torch.searchsorted(layer.offsets[head, 1:].contiguous(), rows, right=True)] = True
    return out


def default_rest(rule: str) -> Rest:
    """REST for the threshold rule; "ignore" for "top", whose budgets have no calibrated choice."""
    return REST if rule == "threshold" else "ignore"


def _checked_rest(rest: Rest | None, rule: str) -> Rest:
    rest = default_rest(rule) if rest is None else rest
    if rest not in REST_CHOICES:
        raise ValueError(f"rest must be one of {REST_CHOICES}, got {rest!r}")
    if rest == "calibrated" and rule != "threshold":
        raise ValueError("rest 'calibrated' needs rule 'threshold': the choice is calibrated per budget")
    return rest


def rests_for(clustered: ClusteredCache, budget: float, rest: Rest) -> tuple[bool, ...]:
    """Per layer, whether squeezed attention estimates the unread clusters under `rest` at `budget`."""
    if rest != "calibrated":
        return (rest == "estimate",) * len(clustered.layers)
    if clustered.thresholds is None or any(t.rest_estimated is None for t in clustered.thresholds):
        raise ValueError("rest 'calibrated' needs a cache whose rest estimate was calibrated (squeeze_document)")
    return tuple(thresholds.estimates_rest(budget) for thresholds in clustered.thresholds)


def rules_for(clustered: ClusteredCache, budget: float, rule: str) -> list[SelectionRule]:
    if rule == "top" or clustered.thresholds is None:
        return [TopBudgetRule(budget) for _ in clustered.layers]
    return [thresholds.rule(budget) for thresholds in clustered.thresholds]


@torch.inference_mode()
def squeeze_document(runner, token_ids: list[int], config: SqueezeConfig, show_progress: bool = False,
                     on_chunk=None, checkpoints: PrefillCheckpoints | None = None,
                     checkpoint_every: int | None = None) -> tuple[SqueezedDocument, torch.Tensor]:
    """Prefill `token_ids` densely, cluster and calibrate; returns the document and its last logits [V].

    on_chunk(done, total) reports prefill progress in tokens. With `checkpoints`, the prefill first
    restores the slices an interrupted run saved and then saves a slice every `checkpoint_every` tokens
    (rounded up to whole prefill chunks, so chunk boundaries, and thus the KV, are those of an
    uninterrupted run; default 8 chunks).
    """
    total = len(token_ids)
    window = min(config.calibration_window, total)
    head = total - window  # tokens before the calibration window: the checkpointed part
    dense = runner.new_cache(total)
    done = _restore_prefill(dense, checkpoints, head, runner.device) if checkpoints is not None else 0
    bar = tqdm(total=total, initial=done, unit="tok", desc="prefill", disable=not show_progress, leave=False)

    def report(position: int) -> None:
        bar.update(position - bar.n)
        if on_chunk is not None:
            on_chunk(position, total)

    chunk = runner.prefill_chunk
    step = max(head, 1)  # without checkpoints: one prefill call
    if checkpoints is not None:
        step = -(-checkpoint_every // chunk) * chunk if checkpoint_every else 8 * chunk  # whole prefill chunks
    for start in range(done, head, step):
        end = min(head, start + step)
        runner.prefill(dense, token_ids[start:end], on_chunk=lambda n, _, start=start: report(start + n))
        if checkpoints is not None:
            checkpoints.save(start, [(layer.keys[0, :, start:end], layer.values[0, :, start:end])
                                     for layer in dense.layers])
    recorder = QueryRecorder()
    logits = runner.prefill(dense, token_ids[-window:], record_queries=recorder)
    report(total)
    bar.close()
    scaling = runner.model.model.layers[0].self_attn.scaling
    start = time.perf_counter()
    layers: list[ClusteredLayer] = []
    for layer in dense.layers:
        keys, values = layer.keys[0, :, : layer.length], layer.values[0, :, : layer.length]  # [Hkv, T, D]
        layers.append(cluster_layer(keys, values, config.cluster))
    cluster_seconds = time.perf_counter() - start
    start = time.perf_counter()
    thresholds = []
    for i, layer in enumerate(layers):
        queries = recorder.queries[i]
        calibrated = calibrate_thresholds(queries, layer, scaling, config.budgets)
        pinned = pinned_clusters(layer, config.sink_tokens, config.cluster.recent_tokens)
        thresholds.append(calibrate_rest(queries, layer, calibrated, scaling, pinned))
    clustered = ClusteredCache(tuple(layers), tuple(thresholds))
    document = SqueezedDocument.for_config(clustered, len(token_ids), config, cluster_seconds=cluster_seconds,
                                           calibrate_seconds=time.perf_counter() - start, resumed_tokens=done)
    return document, logits


def _restore_prefill(cache: KVCache, checkpoints: PrefillCheckpoints, limit: int, device: torch.device) -> int:
    """Load the saved prefill slices into the empty `cache`; returns how many positions they cover."""
    done, layers = checkpoints.restore()
    if done == 0 or done > limit or len(layers) != len(cache.layers):
        return 0
    with torch.inference_mode():
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.update(keys.to(device)[None], values.to(device)[None])
    return done


def dense_cache(clustered: ClusteredCache, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
    """A dense `KVCache` holding the document in its original order (bit-exact), with room to `capacity`.

    A stored clustered cache thus serves dense attention too: no second copy on disk, no re-prefill.
    dtype: cast the keys and values (default: as stored), e.g. to decode a bf16 prefill in fp32.
    """
    first = clustered.layers[0]
    num_tokens = first.num_tokens
    if capacity < num_tokens:
        raise ValueError(f"capacity {capacity} is smaller than the document's {num_tokens} tokens")
    cache = KVCache(len(clustered.layers), capacity)
    with torch.inference_mode():
        for layer, stored in zip(cache.layers, clustered.layers, strict=True):
            keys, values = stored.original_order()  # [Hkv, T, D]
            layer.update(keys[None].to(dtype or keys.dtype), values[None].to(dtype or values.dtype))
    return cache
