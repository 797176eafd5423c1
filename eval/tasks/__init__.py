"""Evaluation tasks: generators of `Example`s (needle, passkey, kv_retrieval, ruler, speed) and the
LongBench-format reader. Synthetic generators are deterministic given their config and corpus."""
