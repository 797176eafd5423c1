"""The `rapid` command line. Parses arguments and settings here, then calls into the packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from api.settings import load_settings


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="'default', a preset ('tiny', 'long-bench'), a model dir or a .gguf")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rope-scaling", choices=["yarn", "dynamic"], help="stretch RoPE past the native context")
    parser.add_argument("--rope-factor", type=float, default=4.0)


def _model_spec(args, settings):
    from rapid.models import ModelSpec, RopeScaling

    scaling = RopeScaling(args.rope_scaling, args.rope_factor) if args.rope_scaling else None
    return ModelSpec(source=settings.model, device=settings.device, dtype=settings.dtype, rope_scaling=scaling)


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

    lm = load_model(_model_spec(args, settings), cache_dir=settings.cache_dir)
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


def _add_qa_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", choices=["none", "retrieval", "self", "layer-skip"], default="self",
                        help="who drafts: nobody (plain decoding), the datastore only, the target on the RAG "
                             "context (RAPID), or the target's first layers")
    parser.add_argument("--no-fusion", action="store_true", help="do not fuse the retrieval tree with the drafter's")
    parser.add_argument("--layer-skip-layers", type=int, default=8)
    parser.add_argument("--tree-budget", type=int, default=16, help="drafted nodes per step, at most")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--eta", type=float, default=0.0,
                        help="RAPID retrieval-augmented target (> 0 moves answers toward the RAG drafter on purpose)")


def answer_question(args, settings, text: str, question: str, out=sys.stdout) -> int:
    """Ingest `text` in-process, stream the answer to `out`, print stats and citations to stderr."""
    from api.detokenize import IncrementalDetokenizer
    from api.qa import AskOptions, DocumentQA, QAConfig
    from rapid.models import load_model
    from rapid.sampling import SamplingConfig
    from retrieval.embedding import Embedder

    lm = load_model(_model_spec(args, settings), cache_dir=settings.cache_dir)
    config = QAConfig(drafter=args.drafter, fuse_retrieval=not args.no_fusion, tree_budget=args.tree_budget,
                      layer_skip_layers=args.layer_skip_layers, answer_reserve=max(1024, args.max_new_tokens))
    qa = DocumentQA(lm, Embedder(), config, prefill_chunk=settings.prefill_chunk)
    print(f"ingesting {len(text)} characters ...", file=sys.stderr)
    document = qa.ingest(text, show_progress=True)
    print(f"document: {len(document.token_ids)} tokens, {len(document.chunks)} chunks, "
          f"prefill {document.prefill_seconds:.1f} s", file=sys.stderr)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    answer = qa.ask(document, question, AskOptions(args.max_new_tokens, sampling, args.eta))
    detok = IncrementalDetokenizer(lm.tokenizer)
    for tokens in answer.tokens:
        out.write("".join(detok.push(t) for t in tokens))
        out.flush()
    out.write(detok.flush() + "\n")
    stats = answer.stats
    print(f"[{stats.num_emitted_tokens} tokens at {stats.tokens_per_second:.1f} tok/s; drafter {args.drafter}; "
          f"mean acceptance length {stats.mean_acceptance_length:.2f}; acceptance rate {stats.acceptance_rate:.2f}; "
          f"RAG context {answer.rag_tokens} tokens]", file=sys.stderr)
    for span in answer.citations[:5]:
        print(f"  cited chunk {span.chunk_index}: chars {span.char_start}-{span.char_end} (score {span.score:.2f})",
              file=sys.stderr)
    return 0


def cmd_ask_file(args, settings) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path} as UTF-8 text: {err}") from err
    return answer_question(args, settings, text, args.question)


DEMO_QUESTION = "Who do the witches say will be king, and what does Macbeth decide to do about it?"


def cmd_demo(args, settings) -> int:
    """The main job on the embedded default: a public-domain play, a question, a streamed answer."""
    from retrieval.texts import shakespeare_works

    works = {work.title: work.text for work in shakespeare_works(settings.cache_dir / "texts")}
    text = works["Macbeth"][: args.chars]
    print(f"Macbeth, first {len(text)} characters; question: {args.question}", file=sys.stderr)
    return answer_question(args, settings, text, args.question)


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
    _add_model_options(gen)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.set_defaults(func=cmd_generate)

    ask = sub.add_parser("ask", help="answer a question about a text file (in-process, speculative)")
    ask.add_argument("question")
    ask.add_argument("--file", required=True, help="a UTF-8 text file")
    _add_model_options(ask)
    _add_qa_options(ask)
    ask.set_defaults(func=cmd_ask_file)

    demo = sub.add_parser("demo", help="ask the default model a question about a public-domain play")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--chars", type=int, default=16000, help="how much of the play to read")
    _add_model_options(demo)
    _add_qa_options(demo)
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
