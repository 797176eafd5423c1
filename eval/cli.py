"""`rapid eval ...` and `rapid bench`: quality suites and the speed suite, from the command line.

    rapid eval small                         # needle grid + passkey + speed, < 15 min on 2 CPU cores
    rapid eval needle --lengths 1K 2K 4K 8K --depths 0 0.25 0.5 0.75 1
    rapid eval needle --needles 3            # multi-needle variant
    rapid eval passkey | kv | ruler --variants multikey multivalue
    rapid eval longbench data/qasper.jsonl --limit 50 --max-document-tokens 4096
    rapid bench --lengths 2K 4K 8K           # Spec-Bench metrics against autoregressive decoding
    rapid eval report runs/eval/small        # re-render tables and plots from examples.jsonl

Each run writes examples.jsonl (one line per answer, as it comes), summary.md, summary.json and PNG
plots into --out (default runs/eval/<suite>), prints the tables, the wall time, and last one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

MODE_HELP = "comma-separated modes (see eval/modes.py): dense, squeezed, rag-only, rapid, rapid-eta, " \
            "rapid-squeezed, retrieval, layer-skip"


def tokens(text: str) -> int:
    """'4096', '4K' or '4k' -> 4096; '1.5K' -> 1536."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kK]?)", text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096 or 4K)")
    value = float(found.group(1)) * (1024 if found.group(2) else 1)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole positive token count: {text!r}")
    return int(value)


def mode_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _common_options(parser: argparse.ArgumentParser, suite: str, modes: tuple[str, ...] | None) -> None:
    from api.settings import CALIBRATED_BUDGETS, SQUEEZE_BUDGET  # no torch: --help stays quick

    parser.add_argument("--model", help="'default', a preset ('tiny'), a model dir or a .gguf")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=Path("runs") / "eval" / suite, help="output folder")
    if modes is not None:
        parser.add_argument("--modes", type=mode_list, default=modes, help=f"{MODE_HELP} (default: {','.join(modes)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generators")
    parser.add_argument("--rag-tokens", type=int, default=512, help="RAG context budget floor in tokens")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="retrieval chunk size in tokens")
    parser.add_argument("--tree-budget", type=int, default=16, help="drafted nodes per step, at most")
    parser.add_argument("--squeeze-budget", type=float, choices=CALIBRATED_BUDGETS, default=SQUEEZE_BUDGET,
                        help="fraction of the document keys squeezed attention reads (calibrated thresholds)")
    parser.add_argument("--rope", choices=["auto", "none"], default="auto",
                        help="auto: YaRN-stretch the target for contexts past its window; none: cut them instead")
    parser.add_argument("--max-document-tokens", type=tokens,
                        help="cut longer documents in the middle (LongBench style) to this many tokens")
    parser.add_argument("--no-progress", action="store_true")


def _grid_options(parser: argparse.ArgumentParser, depths: list[float]) -> None:
    parser.add_argument("--lengths", type=tokens, nargs="+", default=[1024, 2048, 4096], help="context tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=depths, help="needle depths in [0, 1]")


def add_eval_commands(subparsers) -> None:
    """Register `eval` (with its suites) and `bench` on the `rapid` parser's subparsers."""
    from eval.modes import QUALITY_MODES, SPEED_MODES
    from eval.tasks.ruler import VARIANTS

    evaluate = subparsers.add_parser("eval", help="long-context quality suites (needle, passkey, kv, ruler, "
                                                  "longbench), the speed suite, or the small preset")
    suites = evaluate.add_subparsers(dest="eval_command", required=True)

    small = suites.add_parser("small", help="needle grid + passkey + speed; < 15 minutes on 2 CPU cores")
    _common_options(small, "small", None)
    small.set_defaults(func=cmd_small)

    needle = suites.add_parser("needle", help="needle in a Shakespeare haystack: lengths x depths")
    _common_options(needle, "needle", QUALITY_MODES)
    _grid_options(needle, [0.0, 0.25, 0.5, 0.75, 1.0])
    needle.add_argument("--needles", type=int, default=1, help="needles per haystack (multi-needle variant)")
    needle.set_defaults(func=cmd_needle)

    passkey = suites.add_parser("passkey", help="InfiniteBench-style passkey in repeated noise")
    _common_options(passkey, "passkey", QUALITY_MODES)
    _grid_options(passkey, [0.5])
    passkey.set_defaults(func=cmd_passkey)

    kv = suites.add_parser("kv", help="InfiniteBench-style key-value retrieval over a JSON object of UUIDs")
    _common_options(kv, "kv", QUALITY_MODES)
    _grid_options(kv, [0.5])
    kv.set_defaults(func=cmd_kv)

    ruler = suites.add_parser("ruler", help="RULER-style single, multi-key, multi-value, multi-query needles")
    _common_options(ruler, "ruler", QUALITY_MODES)
    _grid_options(ruler, [0.5])
    ruler.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ruler.add_argument("--haystack", choices=["prose", "noise"], default="prose")
    ruler.set_defaults(func=cmd_ruler)

    longbench = suites.add_parser("longbench", help="document QA over a LongBench-format JSONL file")
    longbench.add_argument("file", type=Path, help="JSONL: one {input, context, answers} object a line")
    _common_options(longbench, "longbench", QUALITY_MODES)
    longbench.add_argument("--metric", choices=["f1", "rouge_l", "exact_match"],
                           help="default: ROUGE-L for LongBench's summary sets, token F1 otherwise")
    longbench.add_argument("--limit", type=int, help="read at most this many records")
    longbench.add_argument("--max-new-tokens", type=int, help="default: 256 for ROUGE-L, 64 otherwise")
    longbench.set_defaults(func=cmd_longbench)

    for parser in (suites.add_parser("speed", help="the speed suite (same as `rapid bench`)"),
                   subparsers.add_parser("bench", help="speed suite: Spec-Bench metrics against autoregressive")):
        _common_options(parser, "speed", SPEED_MODES)
        parser.add_argument("--lengths", type=tokens, nargs="+", default=[2048, 4096], help="context tokens")
        parser.add_argument("--questions", type=int, default=3, help="questions per context (at most 3)")
        parser.add_argument("--max-new-tokens", type=int, default=64)
        parser.set_defaults(func=cmd_speed)

    report = suites.add_parser("report", help="re-render the tables and plots of a run folder")
    report.add_argument("run_dir", type=Path, help="a folder holding examples.jsonl")
    report.set_defaults(func=cmd_report)


def _run_config(args, settings):
    from eval.runner import RunConfig
    from rapid.squeeze import SqueezeConfig

    return RunConfig(chunk_tokens=args.chunk_tokens, rag_tokens=args.rag_tokens, tree_budget=args.tree_budget,
                     max_document_tokens=args.max_document_tokens, prefill_chunk=settings.prefill_chunk,
                     squeeze=SqueezeConfig(budget=args.squeeze_budget), progress=not args.no_progress)


def _quality_part(args, name: str, build: Callable) -> Callable:
    from eval.modes import resolve_modes
    from eval.suites import Part

    return lambda sources, config: [Part(name, build(sources), resolve_modes(args.modes), config)]


def _run(args, settings, suite: str, parts: Callable) -> int:
    """Load the target and embedder, build the parts, run them, write and print the report."""
    import torch

    from eval.report import write_report
    from eval.suites import Sources, run_parts
    from eval.targets import Targets
    from rapid.models import ModelSpec
    from retrieval.embedding import Embedder, EmbedderConfig

    start = time.perf_counter()
    torch.set_num_threads(settings.threads)  # one by default: more threads on a shared machine run far slower
    targets = Targets(ModelSpec(settings.model, settings.device, settings.dtype), settings.cache_dir, args.rope)
    embedder = Embedder(EmbedderConfig(model_dir=settings.embedder_dir))
    built = parts(Sources(targets.tokenizer, settings.cache_dir / "texts"), _run_config(args, settings))
    results = run_parts(targets, embedder, built, args.out / "examples.jsonl")
    wall = time.perf_counter() - start
    run = {"suite": suite, "model": settings.model, "device": settings.device, "threads": torch.get_num_threads(),
           "command": " ".join(["rapid", *sys.argv[1:]]), "answers": len(results), "wall_seconds": round(wall, 1)}
    return _print_report(write_report(results, args.out, f"rapid eval {suite}", run), wall)


def _print_report(report, wall: float | None) -> int:
    print(report.text())
    print("\nwrote " + ", ".join(str(f) for f in report.files))
    if wall is not None:
        print(f"wall time {wall:.0f} s ({wall / 60:.1f} min), model load included")
    print(json.dumps(report.summary))
    return 0


def cmd_small(args, settings) -> int:
    from eval.suites import small_parts

    return _run(args, settings, "small", small_parts)


def cmd_needle(args, settings) -> int:
    from eval.tasks.needle import NeedleConfig, needle_examples

    config = NeedleConfig(tuple(args.lengths), tuple(args.depths), args.needles, args.seed)
    return _run(args, settings, "needle", _quality_part(
        args, "needle", lambda sources: needle_examples(sources.tokenizer, sources.corpus, config)))


def cmd_passkey(args, settings) -> int:
    from eval.tasks.passkey import PasskeyConfig, passkey_examples

    config = PasskeyConfig(tuple(args.lengths), tuple(args.depths), args.seed)
    return _run(args, settings, "passkey", _quality_part(
        args, "passkey", lambda sources: passkey_examples(sources.tokenizer, config)))


def cmd_kv(args, settings) -> int:
    from eval.tasks.kv_retrieval import KVConfig, kv_examples

    config = KVConfig(tuple(args.lengths), tuple(args.depths), args.seed)
    return _run(args, settings, "kv", _quality_part(args, "kv", lambda sources: kv_examples(sources.tokenizer, config)))


def cmd_ruler(args, settings) -> int:
    from eval.tasks.ruler import RulerConfig, ruler_examples

    config = RulerConfig(tuple(args.lengths), tuple(args.depths), tuple(args.variants), args.haystack, seed=args.seed)
    return _run(args, settings, "ruler", _quality_part(
        args, "ruler", lambda sources: ruler_examples(sources.tokenizer, sources.corpus, config)))


def cmd_longbench(args, settings) -> int:
    from eval.tasks.longbench import LongBenchConfig, longbench_examples

    config = LongBenchConfig(args.file, args.metric, args.limit, args.max_new_tokens)
    examples = longbench_examples(config)  # read before loading models: a bad file fails fast
    return _run(args, settings, "longbench", _quality_part(args, "longbench", lambda sources: examples))


def cmd_speed(args, settings) -> int:
    from eval.suites import speed_part
    from eval.tasks.speed import QUESTIONS, SpeedConfig

    if not 1 <= args.questions <= len(QUESTIONS):
        raise ValueError(f"--questions must be in [1, {len(QUESTIONS)}]")
    speed = SpeedConfig(tuple(args.lengths), QUESTIONS[: args.questions], args.max_new_tokens, args.seed)
    return _run(args, settings, "speed", lambda sources, config: [speed_part(sources, speed, config, args.modes)])


def cmd_report(args, settings) -> int:
    from eval.report import write_report
    from eval.result import read_results

    results = read_results(args.run_dir / "examples.jsonl")
    summary = args.run_dir / "summary.json"
    previous = json.loads(summary.read_text()) if summary.is_file() else {}
    run = {k: v for k, v in previous.items() if k not in ("quality", "greedy_identity", "modes", "speed")}
    run["answers"] = len(results)
    return _print_report(write_report(results, args.run_dir, f"rapid eval {run.get('suite', 'report')}", run), None)
