"""Dense versus squeezed attention over a long document cache.

For each (model, context): one dense prefill of a public-domain text, clustering + calibration of its
keys (timed against the prefill), then in one process:
  - attention-only latency of one layer (dense attention over every key, as the model runs it, vs
    squeezed_attention over the clusters; with the native kernel, also the range kernel over every key, to show
    its per-key cost);
  - decode-step latency and fraction of document KV read, dense vs squeezed, over `--steps` greedy steps after
    each probe (the document's end, then each of a few questions), where the squeezed run is teacher-forced on
    the dense run's tokens: top-1 agreement (a step agrees when some token is top-1 in both runs, as bf16 logits
    tie exactly; also strictly, by argmax), max logit difference per step, and at each disagreement the gap
    between the dense run's top two logits;
  - in bf16, the same agreement between two exact dense runs: torch's SDPA against our kernel, and the fp32
    model over the same cache (`--no-floors` skips them);
  - needle-in-a-haystack accuracy, dense vs squeezed, for models with real weights.
A model written `default/4` is the default model cut to its first 4 layers (real weights, its final norm
and head, YaRN past 8K): the shapes of the `long-bench` preset, so 64K-128K fit on this CPU, but with a
trained model's attention patterns, so agreement and logit differences mean something (its answers do
not: no needle run). The `long-bench` preset (random weights) is accepted too. Last line: one JSON object.

    python -m eval.bench_kvcache                                  # default 16K 32K, default/4 32K 64K 128K
    python -m eval.bench_kvcache --plan default/4:32768 --steps 32
    python -m eval.bench_kvcache --plan default/4:131072 --document-cache runs/kvcache   # reuse the prefill

`--document-cache DIR` keeps each (model, context)'s clustered cache (kvcache.store, keyed like the service's)
and its last logits, so a later run skips prefill and clustering and reports the times measured when they ran;
an interrupted prefill resumes from the slices saved there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from api.qa import ChatPrompt
from eval.bench_decode import native_context, yarn_for
from kvcache import native
from kvcache.calibration import DEFAULT_BUDGETS
from kvcache.clustering import ClusterConfig
from kvcache.squeezed import SqueezeStats, squeezed_attention
from kvcache.store import CacheError, CacheKey, PrefillCheckpoints, load_cache, save_cache
from rapid.attention import attend_cache, sdpa_only
from rapid.drafters.model import layer_skip_view
from rapid.models import ModelSpec, load_model
from rapid.runner import ModelRunner
from rapid.squeeze import (
    BUDGET,
    DENSE_LAYERS,
    RECENT_TOKENS,
    REST_CHOICES,
    QueryRecorder,
    Rest,
    SqueezeConfig,
    SqueezedDocument,
    dense_cache,
    squeeze_document,
)
from retrieval.texts import insert_needle, shakespeare_text

NEEDLE = "The secret passphrase for the vault is {value}."
NEEDLE_QUESTION = "What is the secret passphrase for the vault? Answer with the passphrase only."
# Agreement is measured after each probe: the document's end, then each question (`--questions` of them), so one
# prefill gives several independent 256-step samples: one sample counts 2-3 steps of near-ties either way.
PROBE_QUESTIONS = ("Who speaks first in this text, and to whom?", "Summarise the last scene in three sentences.",
                   "Which characters are named in the text, and how are they related?")


class Setting(NamedTuple):
    """One row of squeezed attention: budget, dense first layers, unread clusters estimated, keys refined."""

    budget: float
    dense_layers: int
    rest: Rest
    keep_fraction: float | None  # None: whole clusters

    def view(self, document: SqueezedDocument, rule: str) -> SqueezedDocument:
        return document.with_budget(self.budget, rule, dense_layers=self.dense_layers, rest=self.rest,
                                    keep_fraction=self.keep_fraction)


def keep_fraction_arg(value: str) -> float | None:
    return None if value == "none" else float(value)


def text_of(tokenizer, num_tokens: int) -> str:
    text = shakespeare_text()
    encoding = tokenizer(text[: num_tokens * 6], add_special_tokens=False, return_offsets_mapping=True)
    return text[: encoding.offset_mapping[min(num_tokens, len(encoding.input_ids)) - 1][1]]


def median_time(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every round so a busy minute hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def attention_latency(document: SqueezedDocument, layer_idx: int, query: torch.Tensor, repeats: int) -> dict:
    """One layer, one real decode query [1, H, 1, D]: dense attention as the model runs it (our cache kernel for bf16,
    SDPA for fp32) vs squeezed attention (sinks read, empty tail), and with the native kernel the range kernel over
    every key (its cost per key against the dense pass)."""
    layer = document.clustered.layers[layer_idx]
    keys, values = layer.keys[None], layer.values[None]  # [1, Hkv, T, D] (order does not matter)
    empty = keys[:, :, :0]
    scaling = query.shape[-1] ** -0.5
    path = "native" if native.supports(layer.keys, query.shape[1] // layer.keys.shape[0]) else "gathered"
    fns = {
        "dense": lambda: attend_cache(query, keys, values, None, scaling),
        "squeezed": lambda: squeezed_attention(query, layer, document.rules[layer_idx], empty, empty, None, scaling,
                                               always_read=document.always_read[layer_idx],
                                               estimate_rest=document.estimate_rest[layer_idx],
                                               keep_fraction=document.keep_fraction),
    }
    if path == "native":
        num_kv_heads, num_tokens, _ = layer.keys.shape
        folded = query[0].float().reshape(num_kv_heads, -1, query.shape[-1]) * scaling
        whole = (torch.zeros(num_kv_heads, dtype=torch.int64), torch.full((num_kv_heads,), num_tokens),
                 torch.arange(num_kv_heads + 1))
        fns["native_every_key"] = lambda: native.range_attention(folded, layer.keys, layer.values, *whole, None)
    medians = interleaved_medians(fns, repeats)
    return {f"{name}_ms": seconds * 1e3 for name, seconds in medians.items()} | {
        "speedup": medians["dense"] / medians["squeezed"], "path": path}


@dataclass
class Agreement:
    """Top-1 agreement of another run with the dense run, step by step (teacher-forced on the dense tokens).

    bf16 logits tie exactly on some steps (on `default/4` at 32K, 13 of 256), and argmax breaks a tie by token
    index, so a run that sums in another order picks the other tied token half the time. `tied` counts a step as
    agreeing when some token is top-1 in both runs; `strict` only when the argmax tokens are equal.
    """

    steps: int = 0
    strict: int = 0
    tied: int = 0
    dense_ties: int = 0  # steps whose dense top two logits are equal
    max_diff: float = 0.0
    margins: list[float] = field(default_factory=list)  # at each strict miss: the dense run's top-two gap
    regrets: list[float] = field(default_factory=list)  # ... and dense top minus the dense logit of the other's pick

    def add(self, dense: torch.Tensor, other: torch.Tensor) -> None:
        dense, other = dense.float(), other.float()
        dense_top, other_top = int(dense.argmax()), int(other.argmax())
        top_two = dense.topk(2).values
        self.steps += 1
        self.dense_ties += int(top_two[0] == top_two[1])
        self.tied += int(((dense == dense.max()) & (other == other.max())).any())
        if dense_top == other_top:
            self.strict += 1
        else:  # a near tie flips under any small change
            self.margins.append(round(float(top_two[0] - top_two[1]), 4))
            self.regrets.append(round(float(dense[dense_top] - dense[other_top]), 4))
        self.max_diff = max(self.max_diff, float((dense - other).abs().max()))

    def report(self) -> dict:
        return {"top1_agreement": self.tied / self.steps, "top1_agreement_strict": self.strict / self.steps,
                "max_logit_diff": self.max_diff, "miss_dense_margins": sorted(self.margins),
                "miss_dense_regrets": sorted(self.regrets)}

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.steps + other.steps, self.strict + other.strict, self.tied + other.tied,
                         self.dense_ties + other.dense_ties, max(self.max_diff, other.max_diff),
                         self.margins + other.margins, self.regrets + other.regrets)


Step = Callable[[list[int]], torch.Tensor]  # feeds tokens into one run's cache -> the last position's logits [V]


def stepper(runner: ModelRunner, cache, context=contextlib.nullcontext) -> Step:
    def step(ids: list[int]) -> torch.Tensor:
        with context():
            return runner.decode(cache, ids[0]) if len(ids) == 1 else runner.prefill(cache, ids)
    return step


def teacher_forced(dense: Step, others: dict[str, Step], probe: list[int], first_logits: torch.Tensor, steps: int,
                   agreements: dict[str, Agreement], times: dict[str, list[float]]) -> None:
    """Feed every run the probe's tokens (none: go on from the document's end, whose logits are first_logits), then
    `steps` tokens of the dense run's greedy output one at a time; each step compares every other run's logits with
    the dense run's (agreements[name]) and times each run (times[name], seconds)."""
    logits = first_logits
    if probe:
        logits = dense(probe)
        for run in others.values():
            run(probe)
    for _ in tqdm(range(steps), desc=f"{len(others) + 1} runs", unit="step", leave=False):
        token = [int(logits.argmax())]
        start = time.perf_counter()
        logits = dense(token)
        times["dense"].append(time.perf_counter() - start)
        for name, run in others.items():
            start = time.perf_counter()
            other = run(token)
            times[name].append(time.perf_counter() - start)
            agreements[name].add(logits, other)


@torch.inference_mode()
def decode_comparison(runner: ModelRunner, views: dict[str, SqueezedDocument], first_logits: torch.Tensor,
                      steps: int, probes: list[list[int]]) -> dict[str, dict]:
    """Dense vs each squeezed view of one document over `steps` teacher-forced steps after each probe (see
    teacher_forced): one dense run serves every view, and their steps interleave, so the ratios share the noise."""
    for view in views.values():
        view.stats = SqueezeStats()
    document = next(iter(views.values()))
    times = {"dense": []} | {name: [] for name in views}
    per_probe: dict[str, list[Agreement]] = {name: [] for name in views}
    for probe in probes:
        room = len(probe) + steps + 1
        dense = stepper(runner, dense_cache(document.clustered, document.num_tokens + room))
        others = {name: stepper(runner, runner.new_tail_cache(view, room)) for name, view in views.items()}
        agreements = {name: Agreement() for name in views}
        teacher_forced(dense, others, probe, first_logits, steps, agreements, times)
        for name, agreement in agreements.items():
            per_probe[name].append(agreement)
    dense_step = statistics.median(times["dense"])
    rows = {}
    for name, view in views.items():
        pooled, squeezed_step = sum(per_probe[name], Agreement()), statistics.median(times[name])
        rows[name] = {"dense_step_ms": dense_step * 1e3, "squeezed_step_ms": squeezed_step * 1e3,
                      "step_speedup": dense_step / squeezed_step, "kv_read_fraction": view.stats.read_fraction,
                      "steps_compared": pooled.steps, "dense_ties": pooled.dense_ties} | pooled.report() | {
                      "top1_agreement_by_probe": [round(a.tied / a.steps, 4) for a in per_probe[name]]}
    return rows


@torch.inference_mode()
def exact_floors(runner: ModelRunner, fp32_runner: ModelRunner, document: SqueezedDocument,
                 first_logits: torch.Tensor, steps: int, probes: list[list[int]]) -> dict:
    """How well two exact dense runs of a bf16 model agree with its dense path over the same probes: torch's SDPA
    instead of our kernel, and the fp32 model over the same cache cast to fp32. Squeezed attention can hardly agree
    with the dense run better than these do."""
    agreements, times = {"sdpa": Agreement(), "fp32": Agreement()}, {"dense": [], "sdpa": [], "fp32": []}
    for probe in probes:
        capacity = document.num_tokens + len(probe) + steps + 1
        dense = stepper(runner, dense_cache(document.clustered, capacity))
        others = {"sdpa": stepper(runner, dense_cache(document.clustered, capacity), sdpa_only),
                  "fp32": stepper(fp32_runner, dense_cache(document.clustered, capacity, torch.float32))}
        teacher_forced(dense, others, probe, first_logits, steps, agreements, times)
    return {f"floor_{name}_{key}": value for name, agreement in agreements.items()
            for key, value in agreement.report().items() if key.startswith("top1")}


@torch.inference_mode()
def needle_accuracy(lm, runner: ModelRunner, num_tokens: int, depths: list[float], config: SqueezeConfig,
                    settings: list[Setting], rule: str = "threshold", new_tokens: int = 16) -> dict:
    """Greedy answers with dense and squeezed attention over the same prefill; hit = the value appears (any case).

    -> {"dense": accuracy, setting: accuracy, ...}.
    """
    prompt = ChatPrompt(lm.tokenizer)
    hits = {"dense": 0} | {setting: 0 for setting in settings}
    for k, depth in enumerate(depths):
        value = f"{'amber-falcon-river-stone'.split('-')[k % 4]}-{4127 + 31 * k}"
        haystack = insert_needle(text_of(lm.tokenizer, num_tokens), NEEDLE.format(value=value), depth)
        prefix = prompt.head_ids + prompt.encode(haystack.text)
        question = prompt.question_ids(NEEDLE_QUESTION)
        document, _ = squeeze_document(runner, prefix, config)
        for mode in hits:
            if mode == "dense":
                cache = dense_cache(document.clustered, len(prefix) + len(question) + new_tokens + 1)
            else:
                view = mode.view(document, rule)
                cache = runner.new_tail_cache(view, len(question) + new_tokens + 1)
            logits = runner.prefill(cache, question)
            out = [int(logits.argmax())]
            for _ in range(new_tokens - 1):
                out.append(int(runner.decode(cache, out[-1]).argmax()))
            hits[mode] += int(value.lower() in lm.tokenizer.decode(out, skip_special_tokens=True).lower())
    return {mode: hits[mode] / len(depths) for mode in hits}


def prepared_document(runner: ModelRunner, ids: list[int], config: SqueezeConfig, key: CacheKey,
                      folder: Path | None) -> tuple[SqueezedDocument, torch.Tensor, dict]:
    """The document squeezed (prefill, clustering, calibration) and its last logits [V], with the times measured
    for each step; with `folder`, stored there under `key` and reused when a stored one matches (the logits and
    times beside it, in a file of their own carrying the same key)."""
    if folder is None:
        document, logits, times = _squeezed(runner, ids, config, None)
        return document, logits, times | {"document_cache": None}
    name = hashlib.sha256(json.dumps(dataclasses.asdict(key), sort_keys=True).encode()).hexdigest()[:24]
    path, extras = folder / f"{name}.safetensors", folder / f"{name}.logits.safetensors"
    if path.is_file():
        try:
            clustered = load_cache(path, key)
            with safe_open(extras, "pt") as stored:
                if json.loads(stored.metadata()["key"]) != dataclasses.asdict(key):
                    raise CacheError(f"{extras} belongs to another document")
                logits, times = stored.get_tensor("logits"), json.loads(stored.metadata()["times"])
        except (CacheError, SafetensorError, OSError, KeyError, ValueError) as err:
            print(f"not reusing {path} ({err}): prefilling again", flush=True)
        else:
            document = SqueezedDocument.for_config(clustered, len(ids), config)
            return document, logits, times | {"document_cache": "reused"}
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = PrefillCheckpoints(folder / f"{name}.prefill", key)
    document, logits, times = _squeezed(runner, ids, config, checkpoints)
    metadata = {"key": json.dumps(dataclasses.asdict(key)), "times": json.dumps(times)}
    save_file({"logits": logits.contiguous()}, extras, metadata)  # first: the cache file marks both complete
    save_cache(path, document.clustered, key)
    checkpoints.clear()
    return document, logits, times | {"document_cache": "built"}


def _squeezed(runner: ModelRunner, ids: list[int], config: SqueezeConfig,
              checkpoints: PrefillCheckpoints | None) -> tuple[SqueezedDocument, torch.Tensor, dict]:
    start = time.perf_counter()
    document, logits = squeeze_document(runner, ids, config, show_progress=True, checkpoints=checkpoints)
    clustering = document.cluster_seconds + document.calibrate_seconds
    times = {"prefill_s": time.perf_counter() - start - clustering, "cluster_s": document.cluster_seconds,
             "calibrate_s": document.calibrate_seconds, "prefill_resumed_tokens": document.resumed_tokens}
    return document, logits, times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", nargs="+", default=["default:16384", "default:32768", "default/4:32768",
                                                      "default/4:65536", "default/4:131072"],
                        help="MODEL:CONTEXT pairs; MODEL/L keeps the model's first L layers")
    parser.add_argument("--steps", type=int, default=256, help="teacher-forced steps per probe")
    parser.add_argument("--questions", type=int, default=len(PROBE_QUESTIONS), choices=range(len(PROBE_QUESTIONS) + 1),
                        help="probes beyond the document's end: each question's chat turn, then --steps steps")
    parser.add_argument("--budgets", type=float, nargs="+", default=[BUDGET],
                        help="one row per value: a fraction of the keys (calibrated beside the stored budgets "
                             f"{', '.join(f'{b:g}' for b in DEFAULT_BUDGETS)} for --rule threshold)")
    parser.add_argument("--rule", default="threshold", choices=["threshold", "top"])
    parser.add_argument("--dense-layers", type=int, nargs="+", default=[DENSE_LAYERS, 0],
                        help="one row per value: the first L layers read every document key")
    parser.add_argument("--rest", nargs="+", default=["ignore", "calibrated"], choices=REST_CHOICES,
                        help="one row per value: the clusters a query does not read weigh nothing, are "
                             "estimated by centroid and mean value, or either as calibrated per layer")
    parser.add_argument("--keep-fractions", type=keep_fraction_arg, nargs="+", default=[None],
                        help="one row per value: 'none' reads whole clusters; a fraction of the keys treats the "
                             "budget's clusters as candidates and keeps each query's best keys among them "
                             "(rows with a fraction above the budget are skipped)")
    parser.add_argument("--recent-tokens", type=int, default=RECENT_TOKENS,
                        help="the document's last positions form one cluster every query reads (0: none)")
    parser.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 only: also measure how well two exact dense runs agree (torch SDPA for our kernel, "
                             "and fp32 over the same cache), the ceiling for squeezed attention's agreement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--document-cache", default=None, metavar="DIR",
                        help="store each prefilled, clustered document here and reuse it in later runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("settings:", json.dumps(vars(args)), flush=True)
    budgets = tuple(sorted(set(DEFAULT_BUDGETS) | set(args.budgets))) if args.rule == "threshold" else DEFAULT_BUDGETS
    config = SqueezeConfig(ClusterConfig(recent_tokens=args.recent_tokens), budgets=budgets)
    if "calibrated" in args.rest and args.rule != "threshold":
        parser.error("--rest calibrated needs --rule threshold")
    settings = [Setting(budget, dense, rest, keep) for budget in args.budgets
                for dense in args.dense_layers for rest in args.rest for keep in args.keep_fractions
                if keep is None or keep <= budget]
    if not settings:
        parser.error("no valid setting: a keep fraction must not exceed its budget")
    rows = []
    for item in args.plan:
        model, context = item.split(":")[0], int(item.split(":")[1])
        source, _, layers = model.partition("/")
        scaling = yarn_for(native_context(source), context + args.steps + 64) if source != "long-bench" else None
        lm = load_model(ModelSpec(source, device="cpu", dtype=args.dtype, rope_scaling=scaling))
        target = layer_skip_view(lm.model, int(layers)) if layers else lm.model
        runner = ModelRunner(target, prefill_chunk=args.prefill_chunk)
        ids = lm.tokenizer(text_of(lm.tokenizer, context), add_special_tokens=False).input_ids[:context]
        rope = f"{scaling.kind} x{scaling.factor:g}" if scaling else None
        built_as = f"{model} rope={rope} prefill_chunk={args.prefill_chunk}"  # both change the KV's bits
        key = CacheKey.build(built_as, lm.revision, config.cluster, target.dtype, ids, config.budgets)
        folder = Path(args.document_cache) if args.document_cache else None
        document, logits, times = prepared_document(runner, ids, config, key, folder)
        recorder = QueryRecorder()  # the first answer token's queries stand for a decode step's
        with torch.inference_mode():
            runner.prefill(runner.new_tail_cache(document, 2), [int(logits.argmax())], record_queries=recorder)
        middle = target.config.num_hidden_layers // 2
        decode_query = recorder.queries[middle][None].to(target.dtype)  # [1, H, 1, D]
        common = {"model": model, "context": len(ids), "rope_scaling": rope} | times | {
               "cluster_calibrate_over_prefill": (times["cluster_s"] + times["calibrate_s"]) / times["prefill_s"],
               "clusters_per_layer": document.clustered.layers[0].num_clusters, "recent_tokens": args.recent_tokens}
        prompt = ChatPrompt(lm.tokenizer)
        probes = [[]] + [prompt.question_ids(question) for question in PROBE_QUESTIONS[: args.questions]]
        if args.floors and args.dtype == "bfloat16":  # the same weights, upcast: only the arithmetic differs
            fp32_runner = ModelRunner(copy.deepcopy(target).float(), prefill_chunk=args.prefill_chunk)
            common |= exact_floors(runner, fp32_runner, document, logits, args.steps, probes)
            del fp32_runner
            print(json.dumps({k: v for k, v in common.items() if k.startswith("floor")}), flush=True)
        needles = {}
        if source != "long-bench" and not layers and args.needle_depths:
            needles = needle_accuracy(lm, runner, context, args.needle_depths, config, settings, args.rule)
        views, partial = {}, {}
        for setting in settings:
            views[setting] = view = setting.view(document, args.rule)
            partial[setting] = {"rule": args.rule, "budget": setting.budget, "dense_layers": setting.dense_layers,
                                "rest": setting.rest, "keep_fraction": setting.keep_fraction,
                                "rest_estimated_layers": sum(view.estimate_rest[setting.dense_layers:])}
            with torch.inference_mode():
                latency = attention_latency(view, middle, decode_query, 40)
            partial[setting] |= {f"attention_{k}": v for k, v in latency.items()}
        compared = decode_comparison(runner, views, logits, args.steps, probes)
        for setting in settings:
            row = common | partial[setting] | compared[setting]
            if needles:
                row |= {"needle_dense": needles["dense"], "needle_squeezed": needles[setting]}
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
        del document
    result = {"benchmark": "kvcache", "settings": vars(args), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
