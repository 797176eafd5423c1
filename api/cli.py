"""The `rapid` command line. Parses arguments and settings here, then calls into the packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from api.commands import add_service_commands
from api.oneshot import DEMO_QUESTION, cmd_demo
from api.options import add_model_options, add_speculation_options, model_spec
from api.settings import load_settings
from eval.cli import add_eval_commands


def cmd_models_pull(args, settings) -> int:
    from rapid.models.default import pull_default_model

    paths = pull_default_model(settings.cache_dir)
    print(f"default model ready: {paths.converted}")
    print(f"  source gguf (sha256 verified): {paths.gguf}")
    return 0


def cmd_models_list(args, settings) -> int:
    from rapid.models import default as default_model
    from rapid.models.presets import PRESETS

    converted = default_model.converted_dir(settings.cache_dir)
    gguf = default_model.installed_gguf() or default_model.cached_gguf(settings.cache_dir)
    state = "ready" if default_model.is_converted(settings.cache_dir) else "not pulled (run `rapid models pull`)"
    print(f"default  {default_model.DEFAULT_MODEL_NAME:<24} {state}")
    print(f"         converted dir: {converted}")
    print(f"         gguf: {gguf if gguf.is_file() else 'absent'}")
    for name in PRESETS:
        print(f"preset   {name:<24} random weights, built on load")
    return 0


def cmd_generate(args, settings) -> int:
    from api.detokenize import IncrementalDetokenizer
    from rapid.generate import GenerationConfig, GenerationStats, generate
    from rapid.models import load_model
    from rapid.runner import ModelRunner
    from rapid.sampling import SamplingConfig

    lm = load_model(model_spec(args, settings), cache_dir=settings.cache_dir)
    tok = lm.tokenizer
    if args.raw or not tok.chat_template:
        prompt_ids = tok(args.prompt, add_special_tokens=False).input_ids
    else:
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stop = tuple({t for t in (tok.eos_token_id, lm.config.eos_token_id) if isinstance(t, int)})
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_token_ids=stop, sampling=sampling)
    runner = ModelRunner(lm.model, prefill_chunk=settings.prefill_chunk)
    stats = GenerationStats()
    detok = IncrementalDetokenizer(tok)
    for token in generate(runner, prompt_ids, config, stats, show_progress=len(prompt_ids) > 4096):
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.prefill_tokens_per_second:.0f} tok/s prefill; "
          f"{stats.new_tokens} new tokens, {stats.decode_tokens_per_second:.1f} tok/s decode; "
          f"stop: {stats.stop_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapid", description="Long-context RAG speculative decoding")
    parser.add_argument("--cache-dir", type=Path, help="where models and texts are cached (env RAPID_CACHE_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the embedded default model and presets")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("pull", help="fetch, verify and convert the default model").set_defaults(func=cmd_models_pull)
    models_sub.add_parser("list", help="show what is available").set_defaults(func=cmd_models_list)

    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    gen.add_argument("prompt")
    add_model_options(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.set_defaults(func=cmd_generate)

    add_service_commands(sub)
    add_eval_commands(sub)

    demo = sub.add_parser("demo", help="ask the default model a question about a public-domain play")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--chars", type=int, default=16000, help="how much of the play to read")
    demo.add_argument("--max-tokens", type=int, default=200)
    demo.add_argument("--temperature", type=float, default=0.0)
    add_model_options(demo)
    add_speculation_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rapid.models import ModelLoadError
    from rapid.models.default import ModelFetchError

    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(cache_dir=args.cache_dir, model=getattr(args, "model", None),
                                 device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
        import torch

        torch.set_num_threads(settings.threads)
        return args.func(args, settings)
    except (ModelFetchError, ModelLoadError, ValueError) as err:
        print(f"rapid: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
