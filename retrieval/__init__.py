"""Retrieval: text and token ids in, RAG contexts and retrieval trees out. Imports nothing of ours.

chunking      ChunkConfig, Chunk, chunk_document, chunk_text       token windows with exact char spans
embedding     EmbedderConfig, Embedder                             unit float32 sentence vectors
index         IndexConfig, ChunkIndex, SearchHits, IndexFormatError  faiss cosine search, saved and checked
context       RagContextConfig, RagContextBuilder, RagContext      the RAPID short context for a question
suffix_array  suffix_array                                         prefix doubling in numpy
trie          RetrievalTree, build_trie                            continuations as a trie with counts
datastore     DatastoreConfig, TokenDatastore, DatastoreFormatError  longest-suffix lookups -> RetrievalTree
manifest      FormatError, read_manifest, write_manifest           checksummed JSON manifests
texts         shakespeare_works, shakespeare_text, make_haystack   long texts for tests and benchmarks
"""
