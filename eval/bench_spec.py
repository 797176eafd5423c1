"""Speculative decoding speed on document QA: our engine's drafters versus our AR loop and transformers.

For each context length: a public-domain play cut to that many tokens is ingested once (chunks,
index, datastore, target prefill); then for each question every method answers greedily from the same
document state:
  ar            our autoregressive loop (the baseline every ratio is against)
  hf-generate   transformers `model.generate` (stock sdpa attention, DynamicCache)
  hf-early-exit transformers assisted generation with the same layer-skip drafter (`assistant_early_exit`)
  hf-lookup     transformers prompt lookup decoding (`prompt_lookup_num_tokens`)
  spec-*        our engine with each drafter (retrieval, self = RAPID's RAG self-speculation, layer-skip,
                and fused = model drafter + retrieval tree; +recycle adds the recycling drafter, whose table
                of the target's top-k the ingest keeps); self and layer-skip copy their RAG context's KV
                out of the target's cache, spec-self-prefill prefills it (RAPID's original drafter)
transformers methods get the document prefilled into a DynamicCache too. `tokens_per_s` covers one
question end to end after ingest (question prefill, retrieval, the drafter's prefill on its RAG context,
decoding); `decode_tokens_per_s` counts from the first answer token to the last. Contexts past the
native 8K use YaRN. Outputs are checked token for token against `ar`. `--repeats R` runs every method R
times per question, in turn, and keeps each method's median round: this machine's speed swings within
minutes. `--replay-budgets` also replays the retrieval drafter on each AR answer at each tree budget with
free trees: how many tokens a step could accept at best. Last line: one JSON object.

    python -m eval.bench_spec                               # 4K 8K 16K
    python -m eval.bench_spec --contexts 4096 --questions 1 --new-tokens 32
    python -m eval.bench_spec --contexts 32768 --methods spec-retrieval hf-lookup
    python -m eval.bench_spec --contexts 16384 --methods spec-retrieval --skip-hf --replay-budgets 2 4 8 16
    python -m eval.bench_spec --contexts 16384 --questions 3 --dtype bfloat16 --tree-budget 4 --repeats 3 \
        --methods spec-retrieval spec-retrieval+recycle --skip-hf
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass

import torch

from api.qa import AskOptions, DocumentQA, QAConfig
from eval.bench_decode import TokenClock, native_context, yarn_for
from rapid.drafters.retrieval import RetrievalDrafter
from rapid.generate import GenerationConfig, GenerationStats, generate
from rapid.metrics import SpecStats
from rapid.models import ModelSpec, load_model
from retrieval.embedding import Embedder
from retrieval.texts import shakespeare_works

QUESTIONS = (
    "Who speaks the first line of the play, and what exactly does he say? Quote it.",
    "List the characters who appear in the first scene.",
    "What does the ghost look like, according to the guards?",
)
OUR_METHODS = {
    "spec-retrieval": dict(drafter="retrieval"),
    "spec-retrieval+recycle": dict(drafter="retrieval", recycle=True),
    "spec-self": dict(drafter="self", fuse_retrieval=False),
    "spec-self-prefill": dict(drafter="self", fuse_retrieval=False, drafter_kv="prefill"),
    "spec-self+retrieval": dict(drafter="self", fuse_retrieval=True),
    "spec-layer-skip": dict(drafter="layer-skip", fuse_retrieval=False),
    "spec-layer-skip+retrieval": dict(drafter="layer-skip", fuse_retrieval=True),
}
HF_METHODS = ("hf-generate", "hf-early-exit", "hf-lookup")


@dataclass
class Run:
    """One method answering one question: its tokens, end-to-end seconds and decode-only rate; for our
    engine also the mean acceptance length and the shares of decode time spent drafting (model drafter)
    and verifying."""

    tokens: list[int]
    seconds: float
    decode_rate: float
    mal: float = float("nan")
    draft_share: float = float("nan")
    verify_share: float = float("nan")
    identical: bool = True

    @classmethod
    def of_answer(cls, tokens: list[int], seconds: float, stats: SpecStats) -> Run:
        decode = stats.decode_seconds
        if not decode:
            return cls(tokens, seconds, float("nan"), stats.mean_acceptance_length)
        return cls(tokens, seconds, (len(tokens) - 1) / decode, stats.mean_acceptance_length,
                   stats.draft_seconds / decode, stats.verify_seconds / decode)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds


def document_text(tokenizer, num_tokens: int, title: str) -> str:
    text = next(w.text for w in shakespeare_works() if w.title == title)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding.input_ids) < num_tokens:
        raise ValueError(f"{title} has only {len(encoding.input_ids)} tokens; pick a shorter context")
    return text[: encoding.offset_mapping[num_tokens - 1][1]]


def hf_prefill(model, token_ids: list[int], chunk: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for start in range(0, len(token_ids), chunk):
            model(torch.tensor([token_ids[start:start + chunk]]), cache=cache, use_cache=True)
    return cache


def hf_answer(model, method: str, doc_cache, full_ids: list[int], new_tokens: int, stop: list[int],
              layers: int) -> tuple[list[int], float, float]:
    extra = {"hf-generate": {}, "hf-early-exit": {"assistant_early_exit": layers},
             "hf-lookup": {"prompt_lookup_num_tokens": 10}}[method]
    cache = copy.deepcopy(doc_cache)
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([full_ids]), cache=cache, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=stop[0], streamer=clock, **extra)
    tokens = out[0, len(full_ids):].tolist()
    return tokens, time.perf_counter() - start, decode_rate(len(tokens), clock.times[1], clock.times[-1])


def replay_retrieval(datastore, question_ids: list[int], reference: list[int], budget: int) -> tuple[float, float]:
    """What the retrieval drafter would reach on `reference` (the target's greedy answer) with trees of `budget`
    nodes, however much they cost: each step drafts from the tokens so far and accepts the longest path the
    reference follows, then its next token. Returns (mean acceptance length over steps that drafted, as the
    engine counts it; tokens per target forward over every step), the ceilings of the engine's retrieval runs."""
    drafter = RetrievalDrafter(datastore, question_ids)
    new, at, steps, drafts, accepted = reference[:1], 1, 0, 0, 0
    while at < len(reference):
        tree = drafter.propose(new, budget)
        children, node, length = tree.children(), 0, 0
        while at + length < len(reference):
            match = [c for c in children[node] if tree.tokens[c] == reference[at + length]]
            if not match:
                break
            node, length = match[0], length + 1
        steps, drafts, accepted = steps + 1, drafts + (len(tree) > 1), accepted + length
        new, at = reference[at:at + length + 1], at + length + 1
    if not steps:
        return float("nan"), float("nan")
    return 1 + accepted / drafts if drafts else 1.0, 1 + accepted / steps


def median_run(rounds: list[Run], reference: list[int]) -> Run:
    """The round of median end-to-end time (the slower middle one for an even count); identical only if every
    round's tokens equal `reference`."""
    run = sorted(rounds, key=lambda r: r.seconds)[len(rounds) // 2]
    run.identical = all(r.tokens == reference for r in rounds)
    return run


def decode_rate(num_tokens: int, first: float, last: float) -> float:
    """Tokens per second after the first token (prefills excluded)."""
    return (num_tokens - 1) / (last - first) if num_tokens > 1 and last > first else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bf16 trees cost far less than fp32 ones on this CPU; their rows equal one-token "
                             "steps bit for bit (rapid.cache.KV_BLOCK)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds per question, every method once per round; each method's median round counts")
    parser.add_argument("--tree-budget", type=int, default=16)
    parser.add_argument("--budget-policies", nargs="+", default=["cost"], choices=["fixed", "acceptance", "cost"],
                        help="how each step's tree is sized (rapid.budget); each of our methods runs once per policy, "
                             "named METHOD@POLICY when more than one is given")
    parser.add_argument("--layer-skip-layers", type=int, default=8)
    parser.add_argument("--title", default="Hamlet")
    parser.add_argument("--skip-hf", action="store_true", help="only our methods")
    parser.add_argument("--methods", nargs="+", choices=[*OUR_METHODS, *HF_METHODS],
                        help="run only these besides ar (default: all)")
    parser.add_argument("--replay-budgets", type=int, nargs="*", default=[],
                        help="also replay the retrieval drafter on each AR answer at these tree budgets, trees free: "
                             "the mean acceptance length a retrieval run could reach (rows replay-retrieval)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    wanted = set(args.methods or [*OUR_METHODS, *HF_METHODS]) - (set(HF_METHODS) if args.skip_hf else set())
    hf_methods = [name for name in HF_METHODS if name in wanted]
    torch.set_num_threads(args.threads)
    print("settings:", json.dumps(vars(args)), flush=True)
    embedder = Embedder()
    rows = []
    for context in args.contexts:
        scaling = yarn_for(native_context(args.model), context + 2048)
        lm = load_model(ModelSpec(args.model, device="cpu", dtype=args.dtype, rope_scaling=scaling))
        base = dict(tree_budget=args.tree_budget, layer_skip_layers=args.layer_skip_layers,
                    answer_reserve=max(args.new_tokens, 256))
        recycle = any(OUR_METHODS[name].get("recycle") for name in wanted if name in OUR_METHODS)
        ar_qa = DocumentQA(lm, embedder, QAConfig(drafter="none", recycle=recycle, **base))
        start = time.perf_counter()
        document = ar_qa.ingest(document_text(lm.tokenizer, context, args.title))
        ingest_seconds = time.perf_counter() - start
        qas = {name if len(args.budget_policies) == 1 else f"{name}@{policy}":
               DocumentQA(lm, embedder, QAConfig(**base, **kw, budget_policy=policy))
               for name, kw in OUR_METHODS.items() if name in wanted for policy in args.budget_policies}
        stop = list(ar_qa.stop_ids)
        lm.model.config._attn_implementation = "sdpa"
        hf_cache = None if not hf_methods else hf_prefill(lm.model, ar_qa.prompt.head_ids + document.token_ids.tolist(),
                                                        1024)
        lm.model.config._attn_implementation = "rapid"
        runs: dict[str, list[Run]] = {}
        replays: dict[int, list[float]] = {}
        for question in QUESTIONS[: args.questions]:
            question_ids = ar_qa.prompt.question_ids(question)
            gen_config = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=tuple(stop))
            rounds: dict[str, list[Run]] = {}
            for _ in range(args.repeats):  # every method once per round, so a slow spell hits them all
                start = time.perf_counter()
                ar_stats = GenerationStats()
                tokens = list(generate(ar_qa.runner, question_ids, gen_config, ar_stats, cache=document.cache))
                elapsed = time.perf_counter() - start
                document.cache.truncate(document.prefix_len)
                rounds.setdefault("ar", []).append(Run(tokens, elapsed, (len(tokens) - 1) / ar_stats.decode_seconds))
                for name, qa in qas.items():
                    start = time.perf_counter()
                    answer = qa.ask(document, question, AskOptions(max_new_tokens=args.new_tokens))
                    out = [t for chunk in answer.tokens for t in chunk]
                    rounds.setdefault(name, []).append(Run.of_answer(out, time.perf_counter() - start, answer.stats))
                if hf_cache is not None:
                    lm.model.config._attn_implementation = "sdpa"
                    full_ids = ar_qa.prompt.head_ids + document.token_ids.tolist() + question_ids
                    for name in hf_methods:
                        out, seconds, rate = hf_answer(lm.model, name, hf_cache, full_ids, args.new_tokens, stop,
                                                       args.layer_skip_layers)
                        rounds.setdefault(name, []).append(Run(out, seconds, rate))
                    lm.model.config._attn_implementation = "rapid"
            reference = rounds["ar"][0].tokens
            for budget in args.replay_budgets:
                replays.setdefault(budget, []).append(replay_retrieval(document.datastore, question_ids, reference,
                                                                       budget))
            results = {name: median_run(method_rounds, reference) for name, method_rounds in rounds.items()}
            for name, run in results.items():
                runs.setdefault(name, []).append(run)
            print(f"  {context} tokens | {question[:40]!r}: " + ", ".join(
                f"{n} {run.tokens_per_s:.1f} tok/s" for n, run in results.items()), flush=True)
        ar_speed = statistics.median(run.tokens_per_s for run in runs["ar"])
        ar_rate = statistics.median(run.decode_rate for run in runs["ar"])
        assisted = {name: statistics.median(run.tokens_per_s for run in runs[name])
                    for name in ("hf-early-exit", "hf-lookup") if name in runs}
        for name, method_runs in runs.items():
            speed = statistics.median(run.tokens_per_s for run in method_runs)
            rate = statistics.median(run.decode_rate for run in method_runs)
            ours = name.startswith("spec")
            row = {"context": context, "method": name, "tokens_per_s": round(speed, 3),
                   "speedup_vs_ar": round(speed / ar_speed, 3),
                   "decode_tokens_per_s": round(rate, 3), "decode_speedup_vs_ar": round(rate / ar_rate, 3),
                   **{f"speedup_vs_{other.replace('-', '_')}": round(speed / other_speed, 3)
                      for other, other_speed in assisted.items()},
                   "mean_acceptance_length": round(statistics.median(r.mal for r in method_runs), 3) if ours else None,
                   "draft_share": round(statistics.median(r.draft_share for r in method_runs), 3) if ours else None,
                   "verify_share": round(statistics.median(r.verify_share for r in method_runs), 3) if ours else None,
                   "identical_to_ar": all(run.identical for run in method_runs),
                   "new_tokens": sum(len(run.tokens) for run in method_runs),
                   "rope_scaling": scaling.kind if scaling else None, "ingest_seconds": round(ingest_seconds, 1)}
            rows.append(row)
            print(f"{context:6d} {name:26} {speed:7.2f} tok/s  x{row['speedup_vs_ar']:.2f} vs ar  "
                  f"(decode only {rate:6.2f} tok/s, x{row['decode_speedup_vs_ar']:.2f})  "
                  f"MAL {row['mean_acceptance_length']}  draft/verify share {row['draft_share']}/"
                  f"{row['verify_share']}  identical={row['identical_to_ar']}", flush=True)
        for budget, replayed in replays.items():
            mal, per_forward = (statistics.median(values) for values in zip(*replayed, strict=True))
            rows.append({"context": context, "method": "replay-retrieval", "tree_budget": budget,
                         "mean_acceptance_length": round(mal, 3), "tokens_per_forward": round(per_forward, 3),
                         "tokens_per_forward_per_question": [round(t, 3) for _, t in replayed]})
            print(f"{context:6d} replay-retrieval, {budget:2d} nodes: MAL {mal:.3f}, tokens per forward "
                  f"{per_forward:.3f} (per question {', '.join(f'{t:.2f}' for _, t in replayed)})", flush=True)
        del document, hf_cache
    result = {"benchmark": "spec", "settings": vars(args), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
