"""Runs examples x modes through the document-QA pipeline and scores every answer.

Per document (examples sharing a `document_id` share one context): pick the target's RoPE stretch,
cut the context in the middle if it is still too long, then for each attention the modes need,
ingest once and let every mode of that attention answer every question of the document. Ingest
depends only on the attention (chunking, datastore, reserves and squeeze settings are the run's), so
modes that differ in drafter, sampling or eta reuse it. References (the greedy modes a speculative
mode must equal) answer first; each answer is written to the JSONL file as soon as it is scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from api.qa import ChatPrompt, Document, DocumentQA, QAConfig
from eval.modes import Mode
from eval.result import Result
from eval.scoring import score
from eval.targets import Targets
from eval.tasks.example import Example
from eval.tasks.haystack import token_count
from eval.truncation import truncate_middle
from rapid.squeeze import SqueezeConfig
from retrieval.chunking import ChunkConfig
from retrieval.context import RagContextConfig
from retrieval.embedding import Embedder

QUESTION_MARGIN = 16  # cache room beyond the longest question's tokens


@dataclass(frozen=True)
class RunConfig:
    chunk_tokens: int = 256
    rag_tokens: int = 512  # the RAG context budget floor (RAPID uses 4096 at 128K; our contexts are short)
    tree_budget: int = 16
    max_document_tokens: int | None = None  # cut longer documents in the middle, below the model's own limit
    prefill_chunk: int = 1024
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    warmup: bool = False  # answer once untimed per mode before the first measured answer (speed runs)
    progress: bool = True

    def qa_config(self, question_reserve: int, answer_reserve: int) -> QAConfig:
        return QAConfig(chunk=ChunkConfig(chunk_tokens=self.chunk_tokens),
                        rag=RagContextConfig(min_tokens=self.rag_tokens), tree_budget=self.tree_budget,
                        question_reserve=question_reserve, answer_reserve=answer_reserve, squeeze=self.squeeze)


@dataclass(frozen=True)
class DocumentRead:
    """How the target read one document for one attention."""

    tokens: int  # after any middle truncation
    cut_tokens: int
    rope_factor: float
    ingest_seconds: float


def scored_text(example: Example, prediction: str) -> str:
    """What the metric reads: LongBench keeps only the first line for a few of its sets."""
    return prediction.lstrip("\n").split("\n")[0] if example.first_line_only else prediction


class Runner:
    def __init__(self, targets: Targets, embedder: Embedder, modes: list[Mode], config: RunConfig = RunConfig(),
                 on_result: Callable[[Result], None] | None = None):
        if not modes:
            raise ValueError("give at least one mode")
        names = [m.name for m in modes]
        for i, mode in enumerate(modes):
            if mode.reference is not None and mode.reference not in names[:i]:
                raise ValueError(f"mode {mode.name} needs its reference {mode.reference} earlier in the list")
            if mode.reference is not None and modes[names.index(mode.reference)].attention != mode.attention:
                raise ValueError(f"mode {mode.name} and its reference {mode.reference} differ in attention")
        self.targets = targets
        self.embedder = embedder
        self.modes = modes
        self.config = config
        self.on_result = on_result or (lambda result: None)
        self._qa: dict[tuple[float, str], DocumentQA] = {}
        self._warmed: set[str] = set()  # attentions already warmed up

    def run(self, examples: list[Example]) -> list[Result]:
        if not examples:
            return []
        prompt = ChatPrompt(self.targets.tokenizer)
        question_reserve = max(len(prompt.question_ids(e.question)) for e in examples) + QUESTION_MARGIN
        answer_reserve = max(e.max_new_tokens for e in examples)
        base = self.config.qa_config(question_reserve, answer_reserve)
        overhead = len(prompt.head_ids) + question_reserve + answer_reserve + base.tree_budget + 1
        documents: dict[str, list[Example]] = {}
        for example in examples:
            documents.setdefault(example.document_id, []).append(example)
        factors = {key: self._factor(group[0].context, overhead) for key, group in documents.items()}
        results: list[Result] = []
        bar = tqdm(total=len(examples) * len(self.modes), unit="answer", disable=not self.config.progress)
        try:  # documents needing the same RoPE stretch together, so each stretched copy loads once
            for key in sorted(documents, key=lambda k: factors[k]):
                results += self._run_document(documents[key], base, factors[key], overhead, bar)
        finally:
            bar.close()
        return results

    def _factor(self, context: str, overhead: int) -> float:
        tokens = token_count(self.targets.tokenizer, context)
        if self.config.max_document_tokens is not None:
            tokens = min(tokens, self.config.max_document_tokens)
        return self.targets.factor_for(tokens + overhead)

    def _qa_for(self, factor: float, mode: Mode, base: QAConfig) -> DocumentQA:
        key = (factor, mode.name)
        if key not in self._qa:
            if any(f != factor for f, _ in self._qa):
                self._qa.clear()  # the target changed; drop pipelines over the previous copy
            target = self.targets.get(factor)
            config = mode.qa_config(base)
            layers = target.config.num_hidden_layers  # a shallow model drafts with fewer skipped-to layers
            config = replace(config, layer_skip_layers=max(1, min(config.layer_skip_layers, layers - 1)))
            self._qa[key] = DocumentQA(target, self.embedder, config, prefill_chunk=self.config.prefill_chunk)
        return self._qa[key]

    def _run_document(self, examples: list[Example], base: QAConfig, factor: float, overhead: int,
                      bar) -> list[Result]:
        limit = self.targets.get(factor).max_context - overhead
        if self.config.max_document_tokens is not None:
            limit = min(limit, self.config.max_document_tokens)
        document_text = truncate_middle(examples[0].context, self.targets.tokenizer, limit)
        results: list[Result] = []
        for attention in dict.fromkeys(m.attention for m in self.modes):
            modes = [m for m in self.modes if m.attention == attention]
            start = time.perf_counter()
            document = self._qa_for(factor, modes[0], base).ingest(document_text.text)
            ingest_seconds = time.perf_counter() - start
            read = DocumentRead(document_text.tokens, document_text.cut_tokens, factor, ingest_seconds)
            if self.config.warmup and attention not in self._warmed:
                for mode in modes:
                    answer = self._qa_for(factor, mode, base).ask(document, examples[0].question, mode.ask_options(8),
                                                                  rag_only=mode.rag_only)
                    list(answer.tokens)
                self._warmed.add(attention)
            for example in examples:
                tokens_by_mode: dict[str, list[int]] = {}
                for mode in modes:
                    bar.set_description(f"{example.task} {example.length} {mode.name}")
                    result = self._answer(self._qa_for(factor, mode, base), document, read, example, mode,
                                          tokens_by_mode)
                    tokens_by_mode[mode.name] = result.token_ids
                    results.append(result)
                    self.on_result(result)
                    bar.update(1)
        return results

    def _answer(self, qa: DocumentQA, document: Document, read: DocumentRead, example: Example, mode: Mode,
                tokens_by_mode: dict[str, list[int]]) -> Result:
        start = time.perf_counter()
        answer = qa.ask(document, example.question, mode.ask_options(example.max_new_tokens), rag_only=mode.rag_only)
        token_ids = [t for chunk in answer.tokens for t in chunk]
        seconds = time.perf_counter() - start
        prediction = qa.decode_text(token_ids).strip()
        reference = tokens_by_mode.get(mode.reference) if mode.reference is not None else None
        return Result(
            example_id=example.id, task=example.task, length=example.length, depth=example.depth, mode=mode.name,
            prediction=prediction, token_ids=token_ids, references=list(example.references), metric=example.metric,
            score=score(example.metric, scored_text(example, prediction), example.references),
            reference_mode=mode.reference, identical=None if reference is None else token_ids == reference,
            document_tokens=read.tokens, cut_tokens=read.cut_tokens, rope_factor=read.rope_factor,
            rag_tokens=answer.rag_tokens, ingest_seconds=read.ingest_seconds, answer_seconds=seconds,
            stats=answer.stats)
