"""`LocalBackend`: our models and retrieval in this process, behind the `Backend` protocol.

Ingest builds, under the document's folder, each part in a `<name>.partial` folder published by
rename once complete (a part that exists is reused when an interrupted ingest is resumed):

    chunks/     the document's target-tokenizer token ids and chunk spans (+ manifest with checksums)
    index/      the faiss ChunkIndex over the chunk embeddings
    datastore/  the TokenDatastore (suffix index) over the token ids

The target prefill and KV clustering of the document cache (kvcache) are not wired in yet: ingest
records those steps as skipped, and the target reads its prompt per request.

Prompt layout for a question (a chat template rendered once with a marker where the document goes,
so the document's stored token ids are spliced in, never re-tokenized):

    target:  [template before] document ids    [template after: question, assistant turn]
    drafter: [template before] RAG context ids [template after]

The target reads the whole document when it fits the model's window with the answer; otherwise it
reads the RAG context too (reported as `target_context = "retrieved"`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from api.backend import (
    ChatMessage,
    Citation,
    Final,
    GenerationParams,
    IngestInfo,
    IngestStep,
    Piece,
    ProgressFn,
    Prompt,
    Usage,
)
from api.detokenize import IncrementalDetokenizer
from api.errors import IngestCancelled, InvalidParam, NotReady
from api.settings import Settings
from api.stops import StopMatcher
from api.storage import TEXT_FILE, publish_dir
from rapid.generate import GenerationConfig, GenerationStats, generate
from rapid.metrics import SpecStats
from rapid.models import LoadedModel, ModelSpec, load_model
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig
from retrieval.chunking import Chunk, ChunkConfig, chunk_text
from retrieval.context import RagContext, RagContextBuilder, RagContextConfig
from retrieval.datastore import DatastoreConfig, TokenDatastore
from retrieval.embedding import Embedder, EmbedderConfig
from retrieval.index import ChunkIndex
from retrieval.manifest import FormatError, manifest_field, read_manifest, write_manifest

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNKS_FORMAT = "rapid.document_chunks"
CHUNKS_VERSION = 1
DOC_MARK = "\x00rapid-document\x00"  # where the document's ids go in a rendered chat template
ASK_SYSTEM = "Answer the question using only the document the user gives. Be concise."
CHAT_SYSTEM = "Use the document below to answer."
SNIPPET_CHARS = 200
EMBED_BATCH = 64  # chunks per embedding call: the granularity of ingest progress and cancellation
SKIPPED_CACHE = ("the document KV cache (target prefill + clustering) is not built yet; "
                 "the target reads the prompt")


class DocumentFormatError(FormatError):
    """Saved chunks that are damaged or were made with another tokenizer or text."""


@dataclass(frozen=True)
class LocalBackendConfig:
    chunk: ChunkConfig
    rag: RagContextConfig
    datastore: DatastoreConfig
    prefill_chunk: int = 1024
    loaded_documents: int = 8


@dataclass
class DocumentState:
    """One ingested document loaded for questions (kept in an LRU between questions)."""

    token_ids: np.ndarray  # [T] int64
    chunks: list[Chunk]
    rag: RagContextBuilder
    datastore: TokenDatastore


@dataclass(frozen=True)
class PromptLayout:
    """Token ids around the document in the prompt; the document goes between them."""

    before: list[int]
    after: list[int]
    query: str  # what retrieval searches for
    param: str  # the request field the prompt came from, for error messages


class LocalBackend:
    def __init__(self, lm: LoadedModel, embedder: Embedder, config: LocalBackendConfig):
        if lm.tokenizer is None or not getattr(lm.tokenizer, "is_fast", False):
            raise ValueError(f"{lm.model_id} needs a fast (Rust) tokenizer: chunking uses its char offsets")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.embedder = embedder
        self.config = config
        self.runner = ModelRunner(lm.model, prefill_chunk=config.prefill_chunk)
        eos = (self.tokenizer.eos_token_id, lm.config.eos_token_id)
        self.stop_ids = tuple(sorted({t for t in eos if isinstance(t, int)}))
        self._embed_lock = threading.Lock()  # the embedder's tokenizer is not safe across threads
        self._documents: OrderedDict[Path, DocumentState] = OrderedDict()
        self._documents_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, load_embedder: bool = True) -> LocalBackend:
        """Load the target model (and the embedder, unless only raw prompts will be served)."""
        lm = load_model(ModelSpec(source=settings.model, device=settings.device, dtype=settings.dtype),
                        cache_dir=settings.cache_dir)
        embedder = Embedder(EmbedderConfig(model_dir=settings.embedder_dir))
        if load_embedder:
            embedder.model  # noqa: B018 - load it now, in the lifespan, not on the first question
        context = int(lm.max_context)
        rag = RagContextConfig(min_tokens=settings.rag_min_tokens, max_tokens=max(1, context * 3 // 4),
                               similarity_threshold=settings.rag_similarity_threshold)
        config = LocalBackendConfig(chunk=ChunkConfig(chunk_tokens=settings.chunk_tokens), rag=rag,
                                    datastore=DatastoreConfig(), prefill_chunk=settings.prefill_chunk,
                                    loaded_documents=settings.loaded_documents)
        return cls(lm, embedder, config)

    @property
    def model_id(self) -> str:
        return self.lm.model_id

    @property
    def max_context(self) -> int:
        return int(self.lm.max_context)

    # ---- ingest ----------------------------------------------------------------------------------

    def ingest(self, doc_dir: Path, text: str, progress: ProgressFn, cancel: threading.Event) -> IngestInfo:
        def check() -> None:
            if cancel.is_set():
                raise IngestCancelled(str(doc_dir))

        progress("chunk", 0.0)
        (token_ids, chunks), chunk_step = self._part(
            doc_dir, "chunks", lambda d: self._load_chunks(d, text), lambda d: self._build_chunks(d, text))
        check()
        progress("embed", 0.1)
        index, index_step = self._part(
            doc_dir, "index", lambda d: ChunkIndex.load(d, self.embedder.name, count=len(chunks)),
            lambda d: self._build_index(d, chunks, progress, check))
        check()
        progress("datastore", 0.85)
        _, datastore_step = self._part(
            doc_dir, "datastore", self._load_datastore, lambda d: self._build_datastore(d, token_ids))
        progress("done", 1.0)
        steps = (chunk_step, index_step, datastore_step,
                 IngestStep("target_prefill", "skipped", detail=SKIPPED_CACHE),
                 IngestStep("kv_clustering", "skipped", detail=SKIPPED_CACHE))
        return IngestInfo(num_tokens=len(token_ids), num_chunks=len(chunks), steps=steps)

    def _part(self, doc_dir: Path, name: str, load: Callable[[Path], T],
              build: Callable[[Path], T]) -> tuple[T, IngestStep]:
        """Reuse the published part `doc_dir/name` if it loads, else build it and publish it."""
        final, partial = doc_dir / name, doc_dir / f"{name}.partial"
        start = time.perf_counter()
        if final.is_dir():
            try:
                return load(final), IngestStep(name, "reused", time.perf_counter() - start)
            except (FormatError, ValueError, OSError) as err:
                log.warning("rebuilding %s: %s", final, err)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        value = build(partial)
        publish_dir(partial, final)
        return value, IngestStep(name, "done", time.perf_counter() - start)

    def _identity(self) -> dict:
        chunk = self.config.chunk
        return {"model_id": self.lm.model_id, "revision": self.lm.revision,
                "chunk_tokens": chunk.chunk_tokens, "overlap_tokens": chunk.overlap_tokens}

    def _build_chunks(self, folder: Path, text: str) -> tuple[np.ndarray, list[Chunk]]:
        chunked = chunk_text(text, self.tokenizer, self.config.chunk)
        if len(chunked.token_ids) == 0:
            raise ValueError("the document has no tokens")
        spans = np.array([[c.token_start, c.token_end, c.char_start, c.char_end] for c in chunked.chunks],
                         dtype=np.int64)  # [N, 4]
        np.save(folder / "tokens.npy", chunked.token_ids, allow_pickle=False)
        np.save(folder / "spans.npy", spans, allow_pickle=False)
        fields = self._identity() | {"text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                                     "num_tokens": len(chunked.token_ids), "num_chunks": len(spans)}
        write_manifest(folder, CHUNKS_FORMAT, CHUNKS_VERSION, fields, ["tokens.npy", "spans.npy"])
        return chunked.token_ids, chunked.chunks

    def _load_chunks(self, folder: Path, text: str) -> tuple[np.ndarray, list[Chunk]]:
        manifest = read_manifest(folder, CHUNKS_FORMAT, CHUNKS_VERSION, DocumentFormatError)
        expected = self._identity() | {"text_sha256": hashlib.sha256(text.encode()).hexdigest()}
        for key, value in expected.items():
            if manifest.get(key) != value:
                raise DocumentFormatError(folder, f"made with {key}={manifest.get(key)!r}, this server has "
                                                  f"{value!r}: upload the document again")
        token_ids = np.load(folder / "tokens.npy", allow_pickle=False)
        spans = np.load(folder / "spans.npy", allow_pickle=False)
        num_tokens = manifest_field(manifest, "num_tokens", int, folder, DocumentFormatError)
        num_chunks = manifest_field(manifest, "num_chunks", int, folder, DocumentFormatError)
        if token_ids.shape != (num_tokens,) or spans.shape != (num_chunks, 4):
            raise DocumentFormatError(folder, "array shapes do not match the manifest")
        chunks = [Chunk(i, int(ts), int(te), int(cs), int(ce), text[cs:ce])
                  for i, (ts, te, cs, ce) in enumerate(spans.tolist())]
        return token_ids, chunks

    def _build_index(self, folder: Path, chunks: Sequence[Chunk], progress: ProgressFn,
                     check: Callable[[], None]) -> ChunkIndex:
        parts = []
        for begin in range(0, len(chunks), EMBED_BATCH):
            check()
            with self._embed_lock:
                parts.append(self.embedder.embed([c.text for c in chunks[begin:begin + EMBED_BATCH]]))
            progress("embed", 0.1 + 0.7 * min(begin + EMBED_BATCH, len(chunks)) / len(chunks))
        index = ChunkIndex.build(np.concatenate(parts), self.embedder.name)
        index.save(folder)
        return index

    def _build_datastore(self, folder: Path, token_ids: np.ndarray) -> TokenDatastore:
        datastore = TokenDatastore.build([token_ids], self.config.datastore)
        datastore.save(folder)
        return datastore

    def _load_datastore(self, folder: Path) -> TokenDatastore:
        return TokenDatastore.load(folder, self.config.datastore)

    # ---- questions and completions ---------------------------------------------------------------

    def ask(self, doc_dir: Path, question: str, params: GenerationParams,
            cancel: threading.Event) -> Iterator[Piece]:
        content = f"Document:\n{DOC_MARK}\n\nQuestion: {question.replace(DOC_MARK, '')}"
        messages = [ChatMessage("system", ASK_SYSTEM), ChatMessage("user", content)]
        layout = self._split(self._render(messages), query=question, param="question")
        return self._grounded(doc_dir, layout, params, cancel)

    def complete(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event,
                 doc_dir: Path | None = None) -> Iterator[Piece]:
        if isinstance(prompt, str):
            if doc_dir is None:
                ids = self._encode(prompt)
                return self._stream(self._fit(ids, params, "prompt"), ids, None, params, cancel, (),
                                    SpecStats(), "prompt")
            layout = PromptLayout([], self._encode("\n\n" + prompt), query=prompt, param="prompt")
            return self._grounded(doc_dir, layout, params, cancel)
        if doc_dir is None:
            ids = self._encode(self._render(prompt))
            return self._stream(self._fit(ids, params, "messages"), ids, None, params, cancel, (),
                                SpecStats(), "prompt")
        messages = [ChatMessage(m.role, m.content.replace(DOC_MARK, "")) for m in prompt]
        if messages and messages[0].role == "system":
            messages[0] = ChatMessage("system", f"{messages[0].content}\n\nDocument:\n{DOC_MARK}")
        else:
            messages.insert(0, ChatMessage("system", f"{CHAT_SYSTEM}\n\nDocument:\n{DOC_MARK}"))
        query = next((m.content for m in reversed(prompt) if m.role == "user"), "")
        return self._grounded(doc_dir, self._split(self._render(messages), query=query, param="messages"),
                              params, cancel)

    def _grounded(self, doc_dir: Path, layout: PromptLayout, params: GenerationParams,
                  cancel: threading.Event) -> Iterator[Piece]:
        doc = self._document(doc_dir)
        start = time.perf_counter()
        with self._embed_lock:
            context: RagContext = doc.rag.build(layout.query)
        spec = SpecStats(retrieval_seconds=time.perf_counter() - start)
        rag_ids = layout.before + context.token_ids.tolist() + layout.after
        doc_ids = layout.before + doc.token_ids.tolist() + layout.after
        if len(doc_ids) + params.max_tokens <= self.max_context:
            prompt_ids, target_context = doc_ids, "document"
        else:
            prompt_ids, target_context = self._fit(rag_ids, params, layout.param), "retrieved"
        citations = tuple(
            Citation(s.chunk_index, s.char_start, s.char_end, s.token_start, s.token_end, round(s.score, 4),
                     doc.chunks[s.chunk_index].text[:SNIPPET_CHARS])
            for s in context.sources)
        return self._stream(prompt_ids, rag_ids, doc.datastore, params, cancel, citations, spec,
                            target_context)

    def _stream(self, prompt_ids: list[int], rag_ids: list[int], datastore: TokenDatastore | None,
                params: GenerationParams, cancel: threading.Event, citations: tuple[Citation, ...],
                spec: SpecStats, target_context: str) -> Iterator[Piece]:
        """Decode, detokenize and apply stop strings; the last piece carries the `Final`."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        generated = pending = 0
        finish = "length"
        hit_stop_string = False
        tail = ""
        for token in self._decode(prompt_ids, rag_ids, datastore, params, cancel, spec):
            generated += 1
            pending += 1
            if token in self.stop_ids:
                finish = "stop"
                break
            text, hit_stop_string = stops.feed(detok.push(token))
            if hit_stop_string:
                finish, tail = "stop", text
                break
            if text:
                yield Piece(text, pending)
                pending = 0
        if cancel.is_set():
            return
        if not hit_stop_string:
            text, hit_stop_string = stops.feed(detok.flush())
            tail = text if hit_stop_string else text + stops.flush()
            finish = "stop" if hit_stop_string else finish
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=generated)
        yield Piece(tail, pending, Final(finish, usage, spec, citations, target_context))

    def _decode(self, prompt_ids: list[int], rag_ids: list[int], datastore: TokenDatastore | None,
                params: GenerationParams, cancel: threading.Event, spec: SpecStats) -> Iterator[int]:
        """The one decoding call: new token ids of the target given `prompt_ids`, stats into `spec`.

        `rag_ids` (the drafter's prompt: RAG context + question) and `datastore` (retrieval trees) are
        what speculative decoding will use; this autoregressive loop reads only `prompt_ids`, so its
        speculation counters stay zero.
        """
        sampling = SamplingConfig(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  seed=params.seed)
        config = GenerationConfig(max_new_tokens=params.max_tokens, stop_token_ids=self.stop_ids,
                                  sampling=sampling)
        stats = GenerationStats()
        for token in generate(self.runner, prompt_ids, config, stats):
            if cancel.is_set():
                return
            spec.prefill_seconds, spec.decode_seconds = stats.prefill_seconds, stats.decode_seconds
            spec.num_emitted_tokens += 1
            yield token

    def _fit(self, prompt_ids: list[int], params: GenerationParams, param: str) -> list[int]:
        """`prompt_ids` if it and `max_tokens` fit the model's window, else an error naming the field."""
        n, window = len(prompt_ids), self.max_context
        if n == 0:
            raise InvalidParam(param, "the prompt is empty")
        if n >= window:
            raise InvalidParam(param, f"the prompt is {n} tokens; this model reads at most {window}")
        if n + params.max_tokens > window:
            raise InvalidParam("max_tokens", f"the prompt is {n} tokens, so max_tokens can be at most "
                                             f"{window - n} in this model's {window}-token window "
                                             f"(got {params.max_tokens})")
        return prompt_ids

    # ---- helpers ---------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        """The chat prompt as text (the tokenizer's chat template, or plain `role: content` lines)."""
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "

    def _split(self, rendered: str, query: str, param: str) -> PromptLayout:
        at = rendered.index(DOC_MARK)
        before, after = rendered[:at], rendered[at + len(DOC_MARK):]
        return PromptLayout(self._encode(before), self._encode(after), query, param)

    def _document(self, doc_dir: Path) -> DocumentState:
        with self._documents_lock:
            state = self._documents.get(doc_dir)
            if state is not None:
                self._documents.move_to_end(doc_dir)
                return state
        try:
            state = self._load_document(doc_dir)
        except (FormatError, ValueError, OSError) as err:
            raise NotReady(f"document {doc_dir.name} cannot be loaded ({err}); delete it and upload it "
                           "again") from err
        with self._documents_lock:
            self._documents[doc_dir] = state
            while len(self._documents) > self.config.loaded_documents:
                self._documents.popitem(last=False)
        return state

    def _load_document(self, doc_dir: Path) -> DocumentState:
        text = (doc_dir / TEXT_FILE).read_text(encoding="utf-8")
        token_ids, chunks = self._load_chunks(doc_dir / "chunks", text)
        index = ChunkIndex.load(doc_dir / "index", self.embedder.name, count=len(chunks))
        rag = RagContextBuilder(self.embedder, index, chunks, token_ids, self.config.rag)
        return DocumentState(token_ids, chunks, rag, self._load_datastore(doc_dir / "datastore"))
