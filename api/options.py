"""Command-line option groups shared by the `rapid` subcommands."""

from __future__ import annotations

import argparse

from api.settings import Settings


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="'default', a preset ('tiny', 'long-bench'), a model dir or a .gguf")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rope-scaling", choices=["yarn", "dynamic"], help="stretch RoPE past the native context")
    parser.add_argument("--rope-factor", type=float, default=4.0)


def model_spec(args, settings: Settings):
    from rapid.models import ModelSpec, RopeScaling

    kind = getattr(args, "rope_scaling", None)
    scaling = RopeScaling(kind, args.rope_factor) if kind else None
    return ModelSpec(source=settings.model, device=settings.device, dtype=settings.dtype, rope_scaling=scaling)


def add_speculation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", choices=["none", "retrieval", "self", "layer-skip"], default="self",
                        help="who drafts: nobody (plain decoding), the datastore only, the target on the RAG "
                             "context (RAPID), or the target's first layers")
    parser.add_argument("--no-fusion", action="store_true", help="do not fuse the retrieval tree with the drafter's")
    parser.add_argument("--recycle", action="store_true",
                        help="also draft from the target's own earlier predictions (its top-8 after each document "
                             "token, kept by the ingest prefill, then after each verified token)")
    parser.add_argument("--layer-skip-layers", type=int, default=8)
    parser.add_argument("--tree-budget", type=int, default=16, help="drafted nodes per step, at most")
    parser.add_argument("--attention", choices=["dense", "squeezed"], default="dense",
                        help="how the target reads the document: every key, or the selected KV clusters")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--eta", type=float, default=0.0,
                        help="RAPID retrieval-augmented target (> 0 moves answers toward the RAG drafter on purpose)")
