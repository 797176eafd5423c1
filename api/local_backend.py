"""`LocalBackend`: our models and retrieval in this process, behind the `Backend` protocol.

Ingest builds, under the document's folder, each part in a `<name>.partial` folder published by
rename once complete (a part that exists is reused when an interrupted ingest is resumed):

    chunks/     the document's target-tokenizer token ids and chunk spans (+ manifest with checksums)
    index/      the faiss ChunkIndex over the chunk embeddings
    datastore/  the TokenDatastore (suffix index) over the token ids
    kvcache/    the target's KV of the prompt prefix (template head + document), clustered per layer
                (`rapid.squeeze`, `kvcache.store`: keyed by model, revision, cluster config, dtype and
                the prefix ids, CRC-checked, memory-mapped on load). Built when the prefix leaves
                `document_cache_room` tokens of the window; steps `target_prefill` and `kv_clustering`.

Prompt layout (a chat template rendered once with a marker where the document goes, so the
document's stored token ids are spliced in, never re-tokenized). The document sits in the system
message, so `ask` and a document chat without its own system prompt share one prefix:

    target:  [template head] document ids    [template tail: question, assistant turn]
    drafter: [template head] RAG context ids [template tail]

The target reads the whole document when it fits the model's window with the answer; otherwise it
reads the RAG context too (reported as `target_context = "retrieved"`). When the target's prompt
starts with the stored prefix, the engine appends only the tail to the document's KV: a dense cache
rebuilt once from the clusters (bit-exact; shared, one question at a time, cut back after each
answer) or, with `attention = "squeezed"`, a fresh tail cache per question over the clusters. Any
other prompt (a custom system prompt, a raw completion) is prefilled whole, per request.

Decoding is `rapid.engine.SpeculativeEngine` with the configured drafters: the target itself on the
RAG context ("self", RAPID), its first layers ("layer-skip"), the document's datastore
("retrieval"), fused. At temperature 0 the answer is the target's greedy answer with any drafter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch

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
from kvcache.clustering import ClusterConfig
from kvcache.selection import SelectionRule
from kvcache.store import CacheError, CacheKey, ClusteredCache, PrefillCheckpoints, load_cache, save_cache
from rapid.budget import BudgetPolicy
from rapid.cache import KVCache
from rapid.drafters import Drafter, build_drafters
from rapid.drafters.model import DraftConfig, DrafterKV, SharedRows, layer_skip_view
from rapid.engine import EngineConfig, SpeculativeEngine
from rapid.metrics import SpecStats
from rapid.models import LoadedModel, ModelSpec, load_model
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig
from rapid.squeeze import SqueezeConfig, SqueezedDocument, dense_cache, rules_for, squeeze_document
from rapid.verify import VerifyConfig
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
DOCUMENT_SYSTEM = "Answer the question using only the document below. Be concise."
SNIPPET_CHARS = 200
EMBED_BATCH = 64  # chunks per embedding call: the granularity of ingest progress and cancellation
KV_FILE = "document.safetensors"
# overall ingest progress at the start of each stage (the prefill is the slow part of a long document)
PROGRESS = {"chunk": 0.0, "embed": 0.05, "datastore": 0.35, "prefill": 0.4, "kv_clustering": 0.9, "done": 1.0}

DrafterName = Literal["none", "retrieval", "self", "layer-skip"]


class DocumentFormatError(FormatError):
    """Saved chunks that are damaged or were made with another tokenizer or text."""


@dataclass(frozen=True)
class SpeculationConfig:
    drafter: DrafterName = "self"
    fuse_retrieval: bool = True  # add the datastore's retrieval tree to a model drafter's tree
    tree_budget: int = 16
    budget_policy: BudgetPolicy = "cost"  # how each step's tree is sized (rapid.budget)
    layer_skip_layers: int = 8
    eta: float = 0.0  # RAPID retrieval-augmented target: > 0 moves sampled answers toward the drafter
    draft: DraftConfig = field(default_factory=DraftConfig)
    drafter_kv: DrafterKV = "copy"


@dataclass(frozen=True)
class DocumentCacheConfig:
    enabled: bool = True
    room: int = 512  # window tokens a cached prefix must leave for the question and answer
    attention: Literal["dense", "squeezed"] = "dense"
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)  # clustering, calibration, budget, rule
    checkpoint_every: int = 8192  # prefill tokens between two saved slices an interrupted ingest resumes from


@dataclass(frozen=True)
class LocalBackendConfig:
    chunk: ChunkConfig
    rag: RagContextConfig
    datastore: DatastoreConfig
    prefill_chunk: int = 1024
    loaded_documents: int = 8
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    document_cache: DocumentCacheConfig = field(default_factory=DocumentCacheConfig)


@dataclass
class DocumentKV:
    """A document's stored target KV (template head + document), loaded for questions."""

    prefix_len: int
    clustered: ClusteredCache  # on the model's device (memory-mapped on CPU)
    rules: list[SelectionRule]  # per layer, for squeezed attention
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by the question using `dense`
    dense: KVCache | None = None  # dense attention: rebuilt from the clusters once, cut back after each use


@dataclass
class DocumentState:
    """One ingested document loaded for questions (kept in an LRU between questions)."""

    token_ids: np.ndarray  # [T] int64
    chunks: list[Chunk]
    rag: RagContextBuilder
    datastore: TokenDatastore
    kv: DocumentKV | None  # None: no usable stored KV, the target prefills its prompt per request


@dataclass(frozen=True)
class PromptLayout:
    """Token ids around the document in the prompt; the document goes between them."""

    before: list[int]
    after: list[int]
    query: str  # what retrieval searches for
    param: str  # the request field the prompt came from, for error messages


@dataclass(frozen=True)
class DecodeRequest:
    """What one generation reads: the target's prompt, the drafters' views, the stored KV if it applies."""

    prompt_ids: list[int]  # the target's whole prompt
    draft_ids: list[int]  # a model drafter's prompt (head + RAG context + tail)
    datastore: TokenDatastore | None  # the retrieval drafter's source (the document, or the prompt itself)
    query_ids: list[int]  # the retrieval drafter's starting context (what follows the document)
    kv: DocumentKV | None = None  # set when prompt_ids = the stored prefix + query_ids
    shared: SharedRows | None = None  # the target-cache rows a drafter on the target's weights may copy


class LocalBackend:
    def __init__(self, lm: LoadedModel, embedder: Embedder, config: LocalBackendConfig):
        if lm.tokenizer is None or not getattr(lm.tokenizer, "is_fast", False):
            raise ValueError(f"{lm.model_id} needs a fast (Rust) tokenizer: chunking uses its char offsets")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.embedder = embedder
        self.config = config
        self.runner = ModelRunner(lm.model, prefill_chunk=config.prefill_chunk)
        speculation = config.speculation
        self.drafter_runner = {"self": self.runner, "none": None, "retrieval": None}.get(speculation.drafter)
        if speculation.drafter == "layer-skip":
            view = layer_skip_view(lm.model, speculation.layer_skip_layers)
            self.drafter_runner = ModelRunner(view, prefill_chunk=config.prefill_chunk)
        eos = (self.tokenizer.eos_token_id, lm.config.eos_token_id)
        self.stop_ids = tuple(sorted({t for t in eos if isinstance(t, int)}))
        self.document_head = self._split(self._render(self._document_messages(DOCUMENT_SYSTEM, [])), "", "").before
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
        speculation = SpeculationConfig(drafter=settings.drafter, fuse_retrieval=settings.fuse_retrieval,
                                        tree_budget=settings.tree_budget, budget_policy=settings.budget_policy,
                                        layer_skip_layers=settings.layer_skip_layers, eta=settings.eta)
        squeeze = SqueezeConfig(ClusterConfig(recent_tokens=settings.squeeze_recent_tokens),
                                budget=settings.squeeze_budget, rule=settings.squeeze_rule,
                                dense_layers=settings.squeeze_dense_layers,
                                rest=settings.squeeze_rest,
                                keep_fraction=settings.squeeze_keep_fraction)
        document_cache = DocumentCacheConfig(enabled=settings.document_cache, room=settings.document_cache_room,
                                             attention=settings.attention, squeeze=squeeze)
        config = LocalBackendConfig(chunk=ChunkConfig(chunk_tokens=settings.chunk_tokens), rag=rag,
                                    datastore=DatastoreConfig(), prefill_chunk=settings.prefill_chunk,
                                    loaded_documents=settings.loaded_documents, speculation=speculation,
                                    document_cache=document_cache)
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

        progress("chunk", PROGRESS["chunk"])
        (token_ids, chunks), chunk_step = self._part(
            doc_dir, "chunks", lambda d: self._load_chunks(d, text), lambda d: self._build_chunks(d, text))
        check()
        progress("embed", PROGRESS["embed"])
        index, index_step = self._part(
            doc_dir, "index", lambda d: ChunkIndex.load(d, self.embedder.name, count=len(chunks)),
            lambda d: self._build_index(d, chunks, progress, check))
        check()
        progress("datastore", PROGRESS["datastore"])
        _, datastore_step = self._part(
            doc_dir, "datastore", self._load_datastore, lambda d: self._build_datastore(d, token_ids))
        check()
        cache_steps = self._ingest_kv(doc_dir, token_ids, progress, check)
        progress("done", PROGRESS["done"])
        steps = (chunk_step, index_step, datastore_step, *cache_steps)
        return IngestInfo(num_tokens=len(token_ids), num_chunks=len(chunks), steps=steps)

    def _part(self, doc_dir: Path, name: str, load: Callable[[Path], T],
              build: Callable[[Path], T]) -> tuple[T, IngestStep]:
        """Reuse the published part `doc_dir/name` if it loads, else build it and publish it."""
        final, partial = doc_dir / name, doc_dir / f"{name}.partial"
        start = time.perf_counter()
        if final.is_dir():
            try:
                return load(final), IngestStep(name, "reused", time.perf_counter() - start)
            except (FormatError, CacheError, ValueError, OSError) as err:
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
        begin_at, end_at = PROGRESS["embed"], PROGRESS["datastore"]
        for begin in range(0, len(chunks), EMBED_BATCH):
            check()
            with self._embed_lock:
                parts.append(self.embedder.embed([c.text for c in chunks[begin:begin + EMBED_BATCH]]))
            progress("embed", begin_at + (end_at - begin_at) * min(begin + EMBED_BATCH, len(chunks)) / len(chunks))
        index = ChunkIndex.build(np.concatenate(parts), self.embedder.name)
        index.save(folder)
        return index

    def _build_datastore(self, folder: Path, token_ids: np.ndarray) -> TokenDatastore:
        datastore = TokenDatastore.build([token_ids], self.config.datastore)
        datastore.save(folder)
        return datastore

    def _load_datastore(self, folder: Path) -> TokenDatastore:
        return TokenDatastore.load(folder, self.config.datastore)

    # ---- the document KV cache -------------------------------------------------------------------

    def _kv_skip_reason(self, prefix_len: int) -> str | None:
        """Why a document whose prompt prefix has `prefix_len` tokens gets no stored KV (None: it does)."""
        if not self.config.document_cache.enabled:
            return "the document KV cache is off (RAPID_DOCUMENT_CACHE=false): the target reads the prompt"
        room = self.config.document_cache.room
        if prefix_len + room > self.max_context:
            return (f"the prompt prefix is {prefix_len} tokens; with {room} tokens of room for a question and "
                    f"its answer that passes the model's {self.max_context}-token window: questions read the "
                    "retrieved chunks (or the whole prompt, prefilled per request, when it fits)")
        return None

    def _kv_key(self, prefix_ids: list[int]) -> CacheKey:
        dtype = next(self.lm.model.parameters()).dtype
        squeeze = self.config.document_cache.squeeze
        return CacheKey.build(self.lm.model_id, self.lm.revision, squeeze.cluster, dtype, prefix_ids, squeeze.budgets)

    def _ingest_kv(self, doc_dir: Path, token_ids: np.ndarray, progress: ProgressFn,
                   check: Callable[[], None]) -> tuple[IngestStep, IngestStep]:
        """Steps `target_prefill` and `kv_clustering`: prefill the prompt prefix, cluster, save."""
        prefix_ids = self.document_head + token_ids.tolist()
        skipped = self._kv_skip_reason(len(prefix_ids))
        if skipped is not None:
            return (IngestStep("target_prefill", "skipped", detail=skipped),
                    IngestStep("kv_clustering", "skipped", detail=skipped))
        key = self._kv_key(prefix_ids)
        timings: dict[str, float] = {}
        start_at, end_at = PROGRESS["prefill"], PROGRESS["kv_clustering"]

        def on_chunk(done: int, total: int) -> None:
            progress("prefill", start_at + (end_at - start_at) * done / total)
            check()  # raises IngestCancelled between two prefill chunks

        # Prefill slices survive a crash or restart (outside the `.partial` folder `_part` starts afresh).
        checkpoints = PrefillCheckpoints(doc_dir / "prefill.partial", key)

        def build(folder: Path) -> ClusteredCache:
            progress("prefill", start_at)
            start = time.perf_counter()
            squeezed, _ = squeeze_document(self.runner, prefix_ids, self.config.document_cache.squeeze,
                                           on_chunk=on_chunk, checkpoints=checkpoints,
                                           checkpoint_every=self.config.document_cache.checkpoint_every)
            clustering = squeezed.cluster_seconds + squeezed.calibrate_seconds
            timings["prefill"] = time.perf_counter() - start - clustering
            timings["resumed"] = squeezed.resumed_tokens
            progress("kv_clustering", end_at)
            start = time.perf_counter()
            save_cache(folder / KV_FILE, squeezed.clustered, key)
            timings["clustering"] = clustering + time.perf_counter() - start
            return squeezed.clustered

        _, step = self._part(doc_dir, "kvcache", lambda d: load_cache(d / KV_FILE, key), build)
        checkpoints.clear()
        if step.status == "reused":
            return (IngestStep("target_prefill", "reused"), IngestStep("kv_clustering", "reused", step.seconds))
        resumed = timings["resumed"]
        detail = f"resumed at token {resumed} of {len(prefix_ids)} from saved prefill slices" if resumed else ""
        return (IngestStep("target_prefill", "done", timings["prefill"], detail),
                IngestStep("kv_clustering", "done", timings["clustering"]))

    def _load_kv(self, doc_dir: Path, token_ids: np.ndarray) -> DocumentKV | None:
        """The stored KV of a document, or None (with a warning where one should exist but cannot be used)."""
        prefix_ids = self.document_head + token_ids.tolist()
        if self._kv_skip_reason(len(prefix_ids)) is not None:
            return None
        path = doc_dir / "kvcache" / KV_FILE
        if not path.is_file():
            log.warning("document %s has no stored KV cache (ingested before it existed, or without it): its "
                        "questions prefill the whole prompt; upload it again to build one", doc_dir.name)
            return None
        try:
            clustered = load_cache(path, self._kv_key(prefix_ids))
        except (CacheError, OSError) as err:
            log.warning("not using the stored KV cache of document %s (%s): its questions prefill the whole "
                        "prompt; upload it again to rebuild it", doc_dir.name, err)
            return None
        clustered = _on_device(clustered, self.runner.device)
        squeeze = self.config.document_cache.squeeze
        return DocumentKV(len(prefix_ids), clustered, rules_for(clustered, squeeze.budget, squeeze.rule))

    # ---- questions and completions ---------------------------------------------------------------

    def ask(self, doc_dir: Path, question: str, params: GenerationParams,
            cancel: threading.Event) -> Iterator[Piece]:
        messages = self._document_messages(DOCUMENT_SYSTEM, [ChatMessage("user", question.replace(DOC_MARK, ""))])
        layout = self._split(self._render(messages), query=question, param="question")
        return self._grounded(doc_dir, layout, params, cancel)

    def complete(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event,
                 doc_dir: Path | None = None) -> Iterator[Piece]:
        if isinstance(prompt, str):
            if doc_dir is None:
                return self._ungrounded(self._encode(prompt), params, cancel, "prompt")
            layout = PromptLayout([], self._encode("\n\n" + prompt), query=prompt, param="prompt")
            return self._grounded(doc_dir, layout, params, cancel)
        if doc_dir is None:
            return self._ungrounded(self._encode(self._render(prompt)), params, cancel, "messages")
        messages = [ChatMessage(m.role, m.content.replace(DOC_MARK, "")) for m in prompt]
        system = DOCUMENT_SYSTEM
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        query = next((m.content for m in reversed(prompt) if m.role == "user"), "")
        layout = self._split(self._render(self._document_messages(system, messages)), query=query, param="messages")
        return self._grounded(doc_dir, layout, params, cancel)

    def _ungrounded(self, ids: list[int], params: GenerationParams, cancel: threading.Event,
                    param: str) -> Iterator[Piece]:
        """A prompt without a document: drafters read the prompt (retrieval = prompt lookup)."""
        ids = self._fit(ids, params, param)
        datastore = TokenDatastore.build([ids], self.config.datastore) if self._uses_retrieval else None
        request = DecodeRequest(ids, ids, datastore, ids)
        return self._stream(request, params, cancel, (), SpecStats(), "prompt")

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
            kv = doc.kv if layout.before == self.document_head else None
            spans = [(source.token_start, source.token_end) for source in context.sources]
            shared = SharedRows.from_spans(len(layout.before), spans, len(layout.before) + len(doc.token_ids))
            request = DecodeRequest(doc_ids, rag_ids, doc.datastore, layout.after, kv, shared)
            target_context = "document"
        else:
            prompt_ids = self._fit(rag_ids, params, layout.param)
            request, target_context = DecodeRequest(prompt_ids, rag_ids, doc.datastore, layout.after), "retrieved"
        citations = tuple(
            Citation(s.chunk_index, s.char_start, s.char_end, s.token_start, s.token_end, round(s.score, 4),
                     doc.chunks[s.chunk_index].text[:SNIPPET_CHARS])
            for s in context.sources)
        return self._stream(request, params, cancel, citations, spec, target_context)

    def _stream(self, request: DecodeRequest, params: GenerationParams, cancel: threading.Event,
                citations: tuple[Citation, ...], spec: SpecStats, target_context: str) -> Iterator[Piece]:
        """Decode, detokenize and apply stop strings; the last piece carries the `Final`."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        generated = pending = 0
        finish = "length"
        hit_stop_string = False
        tail = ""
        with closing(self._decode(request, params, cancel, spec)) as tokens:  # closing frees the shared KV
            for token in tokens:
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
        usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=generated)
        yield Piece(tail, pending, Final(finish, usage, spec, citations, target_context))

    def _decode(self, request: DecodeRequest, params: GenerationParams, cancel: threading.Event,
                spec: SpecStats) -> Iterator[int]:
        """The one decoding call: the target's new token ids for `request`, the engine's stats into `spec`."""
        speculation = self.config.speculation
        sampling = SamplingConfig(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  seed=params.seed)
        config = EngineConfig(max_new_tokens=params.max_tokens, stop_token_ids=self.stop_ids,
                              tree_budget=speculation.tree_budget, budget_policy=speculation.budget_policy,
                              verify=VerifyConfig(sampling=sampling, eta=speculation.eta))
        engine = SpeculativeEngine(self.runner, config)
        drafters = self._drafters(request, params.max_tokens, sampling)
        with self._target_cache(request, config) as (cache, new_ids):
            for tokens in engine.generate(cache, new_ids, drafters, spec, cancel):
                for token in tokens:
                    if cancel.is_set():
                        return
                    yield token

    def _drafters(self, request: DecodeRequest, max_tokens: int, sampling: SamplingConfig) -> list[Drafter]:
        """The configured drafters, model drafter first (RASD prunes the retrieval tree by its distribution).

        The target itself ("self") drafts only from a context shorter than its own prompt: on the same
        prompt it would be the target twice over.
        """
        speculation = self.config.speculation
        runner = self.drafter_runner
        if runner is self.runner and request.draft_ids == request.prompt_ids:
            runner = None
        shared = request.shared if speculation.drafter_kv == "copy" else None
        return build_drafters(runner, request.draft_ids, request.datastore, request.query_ids, self._uses_retrieval,
                              speculation.draft, max_tokens, speculation.tree_budget, sampling, shared)

    @property
    def _uses_retrieval(self) -> bool:
        speculation = self.config.speculation
        return speculation.drafter == "retrieval" or (speculation.drafter != "none" and speculation.fuse_retrieval)

    @contextmanager
    def _target_cache(self, request: DecodeRequest, config: EngineConfig) -> Iterator[tuple[KVCache, list[int]]]:
        """The target's cache for `request` and the ids the engine appends to it.

        Without stored KV: a fresh cache, the whole prompt. With it: the document's dense cache (shared,
        one question at a time, cut back to the document afterwards; a busy one is copied) or a squeezed
        tail cache over its clusters; either way only the tail after the document is appended.
        """
        kv = request.kv
        if kv is None:
            yield self.runner.new_cache(config.capacity(len(request.prompt_ids))), request.prompt_ids
            return
        tail = config.capacity(len(request.query_ids))
        if self.config.document_cache.attention == "squeezed":
            squeeze = self.config.document_cache.squeeze
            document = SqueezedDocument.for_config(kv.clustered, kv.prefix_len, squeeze, kv.rules)
            yield self.runner.new_tail_cache(document, tail), request.query_ids
            return
        if not kv.lock.acquire(blocking=False):
            yield dense_cache(kv.clustered, kv.prefix_len + tail), request.query_ids
            return
        try:
            if kv.dense is None or kv.dense.capacity < kv.prefix_len + tail:
                kv.dense = None  # free the old one before allocating the larger one
                kv.dense = dense_cache(kv.clustered, kv.prefix_len + max(tail, self.config.document_cache.room))
            yield kv.dense, request.query_ids
        finally:
            if kv.dense is not None:
                kv.dense.truncate(kv.prefix_len)
            kv.lock.release()

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

    @staticmethod
    def _document_messages(system: str, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """A chat grounded in a document: the document closes the system message (a shared prefix)."""
        return [ChatMessage("system", f"{system}\n\nDocument:\n{DOC_MARK}"), *messages]

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
        datastore = self._load_datastore(doc_dir / "datastore")
        return DocumentState(token_ids, chunks, rag, datastore, self._load_kv(doc_dir, token_ids))


def _on_device(clustered: ClusteredCache, device: torch.device) -> ClusteredCache:
    """`clustered` with its tensors on `device` (on the CPU: unchanged, still memory-mapped)."""
    if device.type == "cpu":
        return clustered

    def moved(record):
        return replace(record, **{f.name: getattr(record, f.name).to(device) for f in dataclasses.fields(record)
                                  if isinstance(getattr(record, f.name), torch.Tensor)})

    layers = tuple(replace(moved(layer), coarse=None if layer.coarse is None else moved(layer.coarse))
                   for layer in clustered.layers)
    thresholds = None if clustered.thresholds is None else tuple(moved(t) for t in clustered.thresholds)
    return ClusteredCache(layers, thresholds)
