"""One-shot document QA in this process: `rapid ask --file DOC.txt "question"` and `rapid demo`."""

from __future__ import annotations

import sys

from api.options import model_spec
from api.settings import Settings

DEMO_QUESTION = "Who do the witches say will be king, and what does Macbeth decide to do about it?"


def answer_question(args, settings: Settings, text: str, question: str, out=sys.stdout) -> int:
    """Ingest `text`, stream the answer to `out`, print stats and citations to stderr."""
    from api.detokenize import IncrementalDetokenizer
    from api.qa import AskOptions, DocumentQA, QAConfig
    from rapid.models import load_model
    from rapid.sampling import SamplingConfig
    from retrieval.embedding import Embedder

    max_tokens = args.max_tokens or settings.default_max_tokens
    lm = load_model(model_spec(args, settings), cache_dir=settings.cache_dir)
    config = QAConfig(drafter=args.drafter, fuse_retrieval=not args.no_fusion, recycle=args.recycle,
                      tree_budget=args.tree_budget, layer_skip_layers=args.layer_skip_layers, attention=args.attention,
                      answer_reserve=max(1024, max_tokens))
    qa = DocumentQA(lm, Embedder(), config, prefill_chunk=settings.prefill_chunk)
    print(f"ingesting {len(text)} characters ...", file=sys.stderr)
    document = qa.ingest(text, show_progress=True)
    print(f"document: {len(document.token_ids)} tokens, {len(document.chunks)} chunks, "
          f"prefill {document.prefill_seconds:.1f} s ({args.attention} attention)", file=sys.stderr)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    answer = qa.ask(document, question, AskOptions(max_tokens, sampling, args.eta))
    detok = IncrementalDetokenizer(lm.tokenizer)
    for tokens in answer.tokens:
        out.write("".join(detok.push(t) for t in tokens))
        out.flush()
    out.write(detok.flush() + "\n")
    stats = answer.stats
    print(f"[{stats.num_emitted_tokens} tokens at {stats.tokens_per_second:.1f} tok/s; drafter {args.drafter}"
          f"{' + recycling' if args.recycle else ''}; "
          f"mean acceptance length {stats.mean_acceptance_length:.2f}; acceptance rate {stats.acceptance_rate:.2f}; "
          f"RAG context {answer.rag_tokens} tokens]", file=sys.stderr)
    for span in answer.citations[:5]:
        print(f"  cited chunk {span.chunk_index}: chars {span.char_start}-{span.char_end} (score {span.score:.2f})",
              file=sys.stderr)
    return 0


def cmd_ask_file(args, settings: Settings) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {args.file} as UTF-8 text: {err}") from err
    return answer_question(args, settings, text, args.question)


def cmd_demo(args, settings: Settings) -> int:
    """The main job on the embedded default: a public-domain play, a question, a streamed answer."""
    from retrieval.texts import shakespeare_works

    works = {work.title: work.text for work in shakespeare_works(settings.cache_dir / "texts")}
    text = works["Macbeth"][: args.chars]
    print(f"Macbeth, first {len(text)} characters; question: {args.question}", file=sys.stderr)
    return answer_question(args, settings, text, args.question)
