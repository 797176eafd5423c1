"""Document question answering: the text-level pipeline around the speculative engine.

One `DocumentQA` per loaded target model. `ingest` tokenizes and chunks a document, embeds and
indexes the chunks, builds the token datastore and prefills the target on the document (the part of
the prompt every question shares). `ask` builds the RAG context for a question, prefills the drafter
on it, and streams the engine's answer.

Prompt layout (the model's chat template, rendered once with markers and split):
    target:  [template head] [document tokens]   [question tail]   -> answer
    drafter: [template head] [RAG context tokens] [question tail]  -> drafts
The target's head + document is prefilled at ingest; each question appends its tail, and the cache is
cut back to the document afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rapid.budget import BudgetPolicy
from rapid.cache import KVCache
from rapid.drafters import Drafter, build_drafters
from rapid.drafters.model import DraftConfig, DrafterKV, SharedRows, layer_skip_view
from rapid.drafters.recycle import RECYCLE_TOP_K, NextTokenTable
from rapid.engine import EngineConfig, SpeculativeEngine
from rapid.metrics import SpecStats
from rapid.models import LoadedModel
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig
from rapid.squeeze import SqueezeConfig, SqueezedDocument, squeeze_document
from rapid.verify import VerifyConfig
from retrieval.chunking import Chunk, ChunkConfig, chunk_text
from retrieval.context import RagContext, RagContextBuilder, RagContextConfig, SourceSpan
from retrieval.datastore import DatastoreConfig, TokenDatastore
from retrieval.embedding import Embedder
from retrieval.index import ChunkIndex

DrafterName = Literal["none", "retrieval", "self", "layer-skip", "small"]
DOC_MARK, QUESTION_MARK = "\x00RAPID-DOCUMENT\x00", "\x00RAPID-QUESTION\x00"


class DocumentTooLongError(ValueError):
    """The document (plus question and answer room) does not fit the target's context."""


@dataclass(frozen=True)
class QAConfig:
    drafter: DrafterName = "self"
    fuse_retrieval: bool = True  # add the datastore's retrieval tree to a model drafter's tree
    recycle: bool = False  # add the recycling drafter (rapid.drafters.recycle); a dense ingest keeps the top-k
    layer_skip_layers: int = 8
    draft: DraftConfig = field(default_factory=DraftConfig)
    drafter_kv: DrafterKV = "copy"
    tree_budget: int = 16
    budget_policy: BudgetPolicy = "cost"  # how each step's tree is sized (rapid.budget)
    prune_threshold: float = 0.0
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    rag: RagContextConfig = field(default_factory=RagContextConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    question_reserve: int = 512  # cache room for a question's tokens
    answer_reserve: int = 1024  # cache room for an answer; max_new_tokens must fit in it
    attention: Literal["dense", "squeezed"] = "dense"  # how the target reads the document
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)


@dataclass(frozen=True)
class AskOptions:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eta: float = 0.0  # RAPID retrieval-augmented target; > 0 moves answers toward the RAG drafter

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Document:
    text: str
    token_ids: np.ndarray  # [T] the document alone
    chunks: list[Chunk]
    index: ChunkIndex
    datastore: TokenDatastore
    cache: KVCache | None  # dense target KV of head + document
    squeezed: SqueezedDocument | None  # or the same, clustered (attention "squeezed")
    prefix_len: int
    prefill_seconds: float = 0.0
    next_tokens: NextTokenTable | None = None  # the target's top-k after each prefix token (QAConfig.recycle)


@dataclass
class Answer:
    """Filled while `tokens` is consumed: citations up front, stats complete at the end."""

    tokens: Iterator[list[int]]
    citations: list[SourceSpan]
    rag_tokens: int
    stats: SpecStats
    retrieval_seconds: float


class ChatPrompt:
    """The chat template split around the document and the question."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        content = f"{DOC_MARK}\n\nQuestion: {QUESTION_MARK}"
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True)
        else:
            rendered = content + "\nAnswer:"
        head, rest = rendered.split(DOC_MARK)
        self.middle, self.tail = rest.split(QUESTION_MARK)
        self.head_ids = self.encode(head)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def question_ids(self, question: str) -> list[int]:
        return self.encode(self.middle + question + self.tail)


class DocumentQA:
    def __init__(self, target: LoadedModel, embedder: Embedder, config: QAConfig = QAConfig(),
                 small: LoadedModel | None = None, prefill_chunk: int = 1024):
        if config.drafter == "small" and small is None:
            raise ValueError("drafter 'small' needs a small model sharing the target's tokenizer")
        self.target = target
        self.embedder = embedder
        self.config = config
        self.prompt = ChatPrompt(target.tokenizer)
        self.runner = ModelRunner(target.model, prefill_chunk=prefill_chunk)
        self.drafter_runner = {
            "self": self.runner,
            "layer-skip": ModelRunner(layer_skip_view(target.model, config.layer_skip_layers), prefill_chunk)
            if config.drafter == "layer-skip" else None,
            "small": ModelRunner(small.model, prefill_chunk) if small is not None else None,
        }
        self.stop_ids = tuple(sorted({t for t in (target.tokenizer.eos_token_id, target.config.eos_token_id)
                                      if isinstance(t, int)}))
        self.lock = threading.Lock()  # one question at a time per document cache

    def ingest(self, text: str, on_progress: Callable[[str, float], None] | None = None,
               show_progress: bool = False) -> Document:
        """Chunk, embed, index, build the datastore and prefill the target on the document."""
        report = on_progress or (lambda stage, fraction: None)
        config = self.config
        report("chunk", 0.0)
        chunked = chunk_text(text, self.target.tokenizer, config.chunk)
        doc_ids = chunked.token_ids
        prefix = self.prompt.head_ids + doc_ids.tolist()
        needed = len(prefix) + config.question_reserve + config.answer_reserve + config.tree_budget + 1
        if needed > self.target.max_context:
            raise DocumentTooLongError(
                f"the document has {len(doc_ids)} tokens; with question and answer room that is {needed}, "
                f"past the model's {self.target.max_context}-token context (try --rope-scaling yarn)")
        report("embed", 0.0)
        vectors = self.embedder.embed([c.text for c in chunked.chunks])
        index = ChunkIndex.build(vectors, self.embedder.name)
        report("datastore", 0.0)
        datastore = TokenDatastore.build([doc_ids], config.datastore)
        report("prefill", 0.0)
        start = time.perf_counter()
        on_chunk = lambda done, total: report("prefill", done / total)  # noqa: E731
        cache, squeezed, next_tokens = None, None, None
        if config.attention == "squeezed":
            squeezed, _ = squeeze_document(self.runner, prefix, config.squeeze, show_progress, on_chunk)
        else:
            cache = self.runner.new_cache(needed)
            if config.recycle:
                top = self.runner.prefill_top(cache, prefix, RECYCLE_TOP_K, show_progress, on_chunk)
                next_tokens = NextTokenTable.from_prefill(prefix, top)
            else:
                self.runner.prefill(cache, prefix, show_progress=show_progress, on_chunk=on_chunk)
        document = Document(text, doc_ids, chunked.chunks, index, datastore, cache, squeezed, len(prefix),
                            prefill_seconds=time.perf_counter() - start, next_tokens=next_tokens)
        report("ready", 1.0)
        return document

    def rag_context(self, document: Document, question: str) -> RagContext:
        builder = RagContextBuilder(self.embedder, document.index, document.chunks, document.token_ids, self.config.rag)
        return builder.build(question)

    def ask(self, document: Document, question: str, options: AskOptions = AskOptions(),
            cancel: threading.Event | None = None, rag_only: bool = False) -> Answer:
        """Stream an answer. `rag_only`: the target answers from the RAG context alone (no document
        cache, no drafter), the baseline RAPID compares against."""
        if not question.strip():
            raise ValueError("question must not be empty")
        config = self.config
        if options.max_new_tokens > config.answer_reserve:
            raise ValueError(f"max_new_tokens {options.max_new_tokens} exceeds the answer room "
                             f"{config.answer_reserve} this document was ingested with")
        question_ids = self.prompt.question_ids(question)
        if len(question_ids) > config.question_reserve:
            raise ValueError(f"the question has {len(question_ids)} tokens; at most {config.question_reserve}")
        start = time.perf_counter()
        rag = self.rag_context(document, question)
        retrieval_seconds = time.perf_counter() - start
        drafters = [] if rag_only else self._drafters(document, rag, question_ids, options)
        if rag_only:
            question_ids = self.prompt.head_ids + rag.token_ids.tolist() + question_ids
        engine_config = EngineConfig(
            max_new_tokens=options.max_new_tokens, stop_token_ids=self.stop_ids, tree_budget=config.tree_budget,
            budget_policy=config.budget_policy,
            prune_threshold=config.prune_threshold,
            verify=VerifyConfig(sampling=options.sampling, eta=options.eta))
        stats = SpecStats(retrieval_seconds=retrieval_seconds)
        engine = SpeculativeEngine(self.runner, engine_config)
        tokens = self._stream(document, engine, question_ids, drafters, stats, cancel, rag_only)
        return Answer(tokens, rag.sources, len(rag.token_ids), stats, retrieval_seconds)

    def _stream(self, document: Document, engine: SpeculativeEngine, question_ids: list[int],
                drafters: list[Drafter], stats: SpecStats, cancel: threading.Event | None,
                rag_only: bool) -> Iterator[list[int]]:
        room = engine.config.capacity(len(question_ids))
        if rag_only:
            yield from engine.generate(self.runner.new_cache(room), question_ids, drafters, stats, cancel)
        elif document.squeezed is not None:
            tail = self.runner.new_tail_cache(document.squeezed, room)
            yield from engine.generate(tail, question_ids, drafters, stats, cancel)
        else:
            with self.lock:  # the dense document cache is shared: one question at a time
                try:
                    yield from engine.generate(document.cache, question_ids, drafters, stats, cancel)
                finally:
                    document.cache.truncate(document.prefix_len)

    def _drafters(self, document: Document, rag: RagContext, question_ids: list[int],
                  options: AskOptions) -> list[Drafter]:
        config = self.config
        runner = self.drafter_runner.get(config.drafter)
        use_retrieval = config.drafter == "retrieval" or (runner is not None and config.fuse_retrieval)
        shared = None
        if config.drafter in ("self", "layer-skip") and config.drafter_kv == "copy":
            spans = [(source.token_start, source.token_end) for source in rag.sources]
            shared = SharedRows.from_spans(len(self.prompt.head_ids), spans, document.prefix_len)
        return build_drafters(runner, self.prompt.head_ids + rag.token_ids.tolist() + question_ids,
                              document.datastore, question_ids, use_retrieval, config.draft,
                              options.max_new_tokens, config.tree_budget, options.sampling, shared,
                              recycle=config.recycle and config.drafter != "none", next_tokens=document.next_tokens)

    def decode_text(self, token_ids: list[int]) -> str:
        return self.target.tokenizer.decode(token_ids, skip_special_tokens=True)

