"""What one target forward costs with N tree nodes, against one decode step, at a given context.

The default model prefills a public-domain text of `--context` tokens; then, repeatedly, one token is
decoded or a chain of N nodes is scored with `ModelRunner.score_tree` and the cache cut back. Medians
in ms. This is the price a speculative step pays for its tree. Last line: one JSON object.

    python -m eval.bench_tree --context 8192 --dtype float32
    python -m eval.bench_tree --context 16384 --dtype bfloat16 --attention model sdpa
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from eval.bench_decode import native_context, yarn_for
from eval.bench_kvcache import interleaved_medians, text_of
from rapid.attention import sdpa_only
from rapid.models import ModelSpec, load_model
from rapid.runner import ModelRunner


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention", nargs="+", default=["model"], choices=["model", "sdpa"],
                        help="model: as the model runs (our kernel for bf16 decode steps and trees); sdpa: torch's "
                             "SDPA for every dense cache; both: timed in turn in each round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("settings:", json.dumps(vars(args)), flush=True)
    scaling = yarn_for(native_context(args.model), args.context + max(args.nodes) + 1)
    lm = load_model(ModelSpec(args.model, device="cpu", dtype=args.dtype, rope_scaling=scaling))
    runner = ModelRunner(lm.model)
    ids = lm.tokenizer(text_of(lm.tokenizer, args.context), add_special_tokens=False).input_ids[: args.context]
    cache = runner.new_cache(len(ids) + max(args.nodes) + 1)
    runner.prefill(cache, ids)

    def decode() -> None:
        runner.decode(cache, ids[-1])
        cache.truncate(len(ids))

    def tree(n: int) -> None:
        chain = torch.tril(torch.ones(n, n, dtype=torch.bool))
        runner.score_tree(cache, torch.tensor(ids[-n:]), torch.arange(n), chain)
        cache.truncate(len(ids))

    def under(attention: str, fn):
        def timed() -> None:
            with contextlib.nullcontext() if attention == "model" else sdpa_only():
                fn()
        return timed

    fns = {}
    for attention in args.attention:
        fns[(attention, 1, "decode")] = under(attention, decode)
        fns |= {(attention, n, "tree"): under(attention, lambda n=n: tree(n)) for n in args.nodes}
    with torch.inference_mode():
        medians = interleaved_medians(fns, args.repeats)  # every round times every setting in turn
    rows, decode_ms = [], {}
    for attention in args.attention:
        decode_ms[attention] = medians[(attention, 1, "decode")] * 1e3
        for n in args.nodes:
            row = {"attention": attention, "nodes": n, "ms": medians[(attention, n, "tree")] * 1e3}
            row["over_decode"] = row["ms"] / decode_ms[attention]
            rows.append(row)
            print(f"{args.context} tokens, {attention:5s} attention, {n:3d} nodes: {row['ms']:7.1f} ms = "
                  f"{row['over_decode']:.2f} x one decode step ({decode_ms[attention]:.1f} ms)", flush=True)
    result = {"benchmark": "tree", "settings": vars(args), "context": len(ids), "decode_ms": decode_ms, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
