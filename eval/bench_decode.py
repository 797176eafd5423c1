"""Baseline decode speed: our loop (preallocated cache) versus transformers' `model.generate`.

For each context length and dtype, in one process: prefill tokens/s (time to the first token) and
decode tokens/s (the remaining tokens), medians over repeats. Contexts past the model's native window
get YaRN scaling (speed is what is measured here, not quality). Last line: one JSON object.

    python -m eval.bench_decode                    # 1K 4K 8K 16K, fp32 and bf16
    python -m eval.bench_decode --contexts 1024 --dtypes float32 --repeats 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rapid.generate import GenerationConfig, GenerationStats, generate
from rapid.models import ModelSpec, RopeScaling, load_model
from rapid.runner import ModelRunner


def context_ids(tokenizer, length: int, cache_dir) -> list[int]:
    """`length` token ids of public-domain text (repeated if needed)."""
    from retrieval.texts import shakespeare_text

    ids = tokenizer(shakespeare_text(cache_dir) if cache_dir else shakespeare_text(),
                    add_special_tokens=False).input_ids
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def native_context(model: str) -> int:
    return load_model(ModelSpec(model, device="cpu")).max_context


def yarn_for(native: int, needed: int) -> RopeScaling | None:
    """The smallest power-of-two YaRN stretch of `native` that holds `needed` tokens (None if it fits)."""
    factor = 1
    while native * factor < needed:
        factor *= 2
    return RopeScaling("yarn", float(factor)) if factor > 1 else None


def time_ours(runner: ModelRunner, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    stats = GenerationStats()
    for _ in generate(runner, prompt, GenerationConfig(max_new_tokens=new_tokens), stats):
        pass
    return stats.prefill_tokens_per_second, (new_tokens - 1) / stats.decode_seconds


class TokenClock:
    """A `generate` streamer that timestamps each new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Prefill tokens/s = prompt / time to the first new token; decode = the rest, token to token."""
    clock = TokenClock()
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, streamer=clock)
    first, last = clock.times[1], clock.times[-1]
    return len(prompt) / (first - start), (new_tokens - 1) / (last - first)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = vars(args)
    print("settings:", json.dumps(settings))
    rows = []
    for dtype in args.dtypes:
        for context in args.contexts:
            scaling = yarn_for(native_context(args.model), context + args.new_tokens + 64)
            lm = load_model(ModelSpec(args.model, device="cpu", dtype=dtype, rope_scaling=scaling))
            prompt = context_ids(lm.tokenizer, context, None)
            runner = ModelRunner(lm.model, prefill_chunk=args.prefill_chunk)
            ours, hf = [], []
            for _ in range(args.repeats):
                ours.append(time_ours(runner, prompt, args.new_tokens))
                lm.model.config._attn_implementation = "sdpa"  # transformers' stock path for its own loop
                hf.append(time_hf(lm.model, prompt, args.new_tokens))
                lm.model.config._attn_implementation = "rapid"
            row = {
                "dtype": dtype, "context": context, "rope_scaling": scaling.kind if scaling else None,
                "ours_prefill_tok_s": statistics.median(p for p, _ in ours),
                "ours_decode_tok_s": statistics.median(d for _, d in ours),
                "hf_prefill_tok_s": statistics.median(p for p, _ in hf),
                "hf_decode_tok_s": statistics.median(d for _, d in hf),
            }
            row["decode_speedup"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
            rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
            print(f"{dtype:9} {context:6d}  ours prefill {row['ours_prefill_tok_s']:8.1f} tok/s  decode "
                  f"{row['ours_decode_tok_s']:6.2f} tok/s | generate prefill {row['hf_prefill_tok_s']:8.1f} "
                  f"decode {row['hf_decode_tok_s']:6.2f} | decode x{row['decode_speedup']:.2f}", flush=True)
    result = {"benchmark": "decode", "settings": settings, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
