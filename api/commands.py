"""The service's CLI subcommands: `rapid serve`, `rapid ingest`, `rapid ask`, `rapid summarize`.

`ingest` and `ask` talk to a running server with `--url`, or run in this process on the same data
directory a server would use. `summarize` always runs in this process. All of them go through the
same service layer as the HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from api.errors import ServiceError
from api.oneshot import cmd_ask_file
from api.options import add_model_options, add_speculation_options
from api.remote import RemoteClient, RemoteError
from api.settings import Settings


def add_service_commands(subparsers) -> None:
    """Register serve, ingest, ask and summarize on the `rapid` parser's subparsers."""
    serve = subparsers.add_parser("serve", help="run the HTTP API (documents, questions, OpenAI-compatible)")
    add_model_options(serve)
    _data_dir_option(serve)
    serve.add_argument("--host", help="bind address (env RAPID_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env RAPID_PORT, default 8000)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    ingest = subparsers.add_parser("ingest", help="store a text file as a document and ingest it")
    ingest.add_argument("file", type=Path)
    ingest.add_argument("--name", help="document name (default: the file name)")
    _remote_options(ingest)
    add_model_options(ingest)
    _data_dir_option(ingest)
    ingest.set_defaults(func=cmd_ingest)

    ask = subparsers.add_parser("ask", help="ask about an ingested document (DOC_ID) or a text file (--file)",
                                usage="rapid ask DOC_ID QUESTION [options] | rapid ask --file DOC.txt QUESTION")
    ask.add_argument("doc_id", nargs="?", help="an ingested document's id")
    ask.add_argument("question")
    ask.add_argument("--file", type=Path, help="answer about this UTF-8 text file in this process instead")
    ask.add_argument("--max-tokens", type=int, help="default: RAPID_DEFAULT_MAX_TOKENS")
    ask.add_argument("--temperature", type=float, default=0.0)
    _remote_options(ask)
    add_model_options(ask)
    add_speculation_options(ask)
    _data_dir_option(ask)
    ask.set_defaults(func=cmd_ask)

    summarize = subparsers.add_parser("summarize", help="summarize a JSONL file or a folder of text files")
    summarize.add_argument("input", type=Path, help='a .jsonl file ({"text": ..., "id": ...} a line) or a folder')
    summarize.add_argument("--out", type=Path, required=True, help="JSONL output; re-running resumes it")
    summarize.add_argument("--max-tokens", type=int, default=128)
    summarize.add_argument("--temperature", type=float, default=0.0)
    summarize.add_argument("--no-progress", action="store_true")
    add_model_options(summarize)
    summarize.set_defaults(func=cmd_summarize)


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="documents and metadata (env RAPID_DATA_DIR)")


def _remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (default: in this process)")
    parser.add_argument("--api-key", help="Bearer key for --url")


def _with(settings: Settings, **overrides) -> Settings:
    return settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _fail(message: str) -> int:
    print(f"rapid: error: {message}", file=sys.stderr)
    return 1


def cmd_serve(args, settings: Settings) -> int:
    import uvicorn

    from api.main import create_app

    settings = _with(settings, data_dir=args.data_dir, host=args.host, port=args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _open_services(settings: Settings, load_embedder: bool = True):
    from api.local_backend import LocalBackend
    from api.service import Services

    return Services.open(settings, LocalBackend.from_settings(settings, load_embedder=load_embedder), recover=False)


def _wait_ingested(get: Callable[[], dict], interval_s: float = 0.2) -> dict:
    """Poll a document until it is ready or failed, with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=100, unit="%", desc="ingest", file=sys.stderr) as bar:
        while (doc := get())["status"] not in ("ready", "failed"):
            bar.set_description(f"ingest: {doc['stage'] or doc['status']}")
            bar.update(int(doc["progress"] * 100) - bar.n)
            time.sleep(interval_s)
        bar.update(100 - bar.n if doc["status"] == "ready" else 0)
    return doc


def cmd_ingest(args, settings: Settings) -> int:
    from api.schemas import DocumentOut

    if not args.file.is_file():
        return _fail(f"{args.file} is not a file")
    name = args.name or args.file.name
    try:
        if args.url:
            with RemoteClient(args.url, args.api_key) as client:
                doc_id = client.upload(args.file, name)["id"]
                doc = _wait_ingested(lambda: client.document(doc_id))
        else:
            services = _open_services(_with(settings, data_dir=args.data_dir))
            try:
                record = services.documents.create_from_bytes(args.file.read_bytes(), name)
                doc = _wait_ingested(lambda: DocumentOut.from_record(services.documents.get(record.id)).model_dump())
            finally:
                services.close()
    except (ServiceError, RemoteError) as err:
        return _fail(str(err))
    if doc["status"] != "ready":
        return _fail(f"{doc['id']} failed to ingest: {doc['error']}")
    print(doc["id"])
    print(f"[{doc['num_tokens']} tokens, {doc['num_chunks']} chunks; steps: "
          + ", ".join(f"{s['name']} {s['status']}" for s in doc["steps"]) + "]", file=sys.stderr)
    return 0


def _print_answer_stats(answer: dict) -> None:
    usage, spec = answer["usage"], answer["speculation"]
    cited = ", ".join(f"chunk {c['chunk_index']} (chars {c['char_start']}-{c['char_end']})"
                      for c in answer["citations"])
    print(f"[{usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} new, finish: "
          f"{answer['finish_reason']}; target read the {answer['target_context']}; mean acceptance length "
          f"{spec['mean_acceptance_length']:.2f}; cited: {cited or 'nothing'}]", file=sys.stderr)


def cmd_ask(args, settings: Settings) -> int:
    if args.file is not None:
        if args.doc_id is not None:
            return _fail("give a DOC_ID or --file, not both")
        return cmd_ask_file(args, settings)
    if args.doc_id is None:
        return _fail("give the DOC_ID of an ingested document, or --file DOC.txt")
    try:
        if args.url:
            answer = _ask_remote(args)
        else:
            answer = _ask_local(args, _with(settings, data_dir=args.data_dir))
    except (ServiceError, RemoteError) as err:
        return _fail(str(err))
    _print_answer_stats(answer)
    return 0


def _ask_remote(args) -> dict:
    with RemoteClient(args.url, args.api_key) as client:
        for event, data in client.ask_events(args.doc_id, args.question, args.max_tokens, args.temperature):
            if event == "delta":
                sys.stdout.write(data["text"])
                sys.stdout.flush()
            elif event == "answer":
                sys.stdout.write("\n")
                return data
            elif event == "error":
                raise RemoteError(data["error"]["message"])
    raise RemoteError("the server closed the stream without an answer")


def _ask_local(args, settings: Settings) -> dict:
    from api.schemas import AskResponse, new_id

    services = _open_services(settings)
    try:
        generation = services.generation
        params = generation.params(args.max_tokens, args.temperature)

        async def run() -> dict:
            started = await generation.ask(args.doc_id, args.question, params)
            texts = []
            async for piece in started:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                texts.append(piece.text)
                if piece.final is not None:
                    sys.stdout.write("\n")
                    answer = AskResponse.build(new_id("ask"), args.doc_id, generation.model_name, "".join(texts),
                                               piece.final)
                    return answer.model_dump()
            raise RemoteError("the generation ended without an answer")

        return asyncio.run(run())
    finally:
        services.close()


def cmd_summarize(args, settings: Settings) -> int:
    from api.summarize import summarize

    if not args.input.exists():
        return _fail(f"{args.input} does not exist")
    services = _open_services(settings, load_embedder=False)
    try:
        params = services.generation.params(args.max_tokens, args.temperature)
        report = summarize(services.generation, args.input, args.out, params, show_progress=not args.no_progress)
    except ServiceError as err:
        return _fail(str(err))
    finally:
        services.close()
    print(f"[{report.total} rows: {report.summarized} summarized, {report.failed} failed, "
          f"{report.skipped} already done] -> {args.out}", file=sys.stderr)
    return 0
