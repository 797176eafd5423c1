import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.datastore import (
    DatastoreConfig,
    DatastoreFormatError,
    TokenDatastore,
    scan_longest_suffix,
)
from retrieval.manifest import file_sha256

UNLIMITED = DatastoreConfig(max_query_tokens=16, max_depth=4, max_branches=100, max_occurrences=10_000)


def reference_lookup(sources: list[list[int]], query: list[int], max_query: int, depth: int):
    """Naive longest-suffix search: the match length and the counts of every continuation prefix."""
    tail = query[-max_query:]
    best, continuations = 0, []
    for length in range(1, len(tail) + 1):
        pattern = tail[-length:]
        found = [
            seq[end : end + depth]
            for seq in sources
            for end in range(length, len(seq))  # a token must follow the occurrence
            if seq[end - length : end] == pattern
        ]
        if found:
            best, continuations = length, found
    prefixes = Counter(tuple(c[:d]) for c in continuations for d in range(1, len(c) + 1))
    return best, prefixes


def tree_prefix_counts(tree) -> Counter:
    return Counter({tuple(tree.path(i)): int(tree.counts[i]) for i in range(len(tree))})


def test_worked_example():
    store = TokenDatastore.build([[7, 8, 9, 7, 8]])
    assert store.tokens.tolist() == [-1, 7, 8, 9, 7, 8, -2]
    assert store.entries.tolist() == [2, 5, 3, 4]
    match = store.longest_match([3, 7])
    assert match.length == 1 and match.starts.tolist() == [2, 5]
    assert store.continuations(match.starts) == [[8, 9, 7, 8], [8]]
    tree = store.lookup([3, 7])
    assert tree.match_length == 1 and tree.total_occurrences == 2 and tree.sources == ("datastore",)
    assert tree.tokens.tolist() == [8, 9, 7, 8] and tree.counts.tolist() == [2, 1, 1, 1]


def test_scan_worked_example():
    match = scan_longest_suffix([1, 2, 3, 1, 2], [9, 1, 2], max_query_tokens=16)
    assert match.length == 2 and match.starts.tolist() == [2]


@settings(max_examples=300, deadline=None)
@given(
    documents=st.lists(st.lists(st.integers(0, 4), max_size=60), min_size=1, max_size=3),
    query=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    extra=st.lists(st.integers(0, 4), max_size=20),
    max_query=st.integers(1, 8),
)
def test_agrees_with_brute_force(documents, query, extra, max_query):
    config = DatastoreConfig(max_query_tokens=max_query, max_depth=4, max_branches=100, max_occurrences=10_000)
    store = TokenDatastore.build(documents, config)
    expected_length, expected_counts = reference_lookup([*documents, extra], query, max_query, depth=4)
    tree = store.lookup(query, extra=extra)
    assert tree.match_length == expected_length
    assert tree_prefix_counts(tree) == expected_counts
    # the datastore alone, against the naive search over the documents only
    stored_length, _ = reference_lookup(documents, query, max_query, depth=4)
    assert store.longest_match(query).length == stored_length
    assert scan_longest_suffix(extra, query, max_query).length == reference_lookup([extra], query, max_query, 4)[0]


def test_matches_do_not_cross_documents():
    store = TokenDatastore.build([[1, 2], [3, 4]], UNLIMITED)
    assert store.lookup([2, 3]).match_length == 1  # [2, 3] spans the boundary; only [3] matches
    assert store.lookup([2]).match_length == 0  # 2 ends its document: nothing follows it
    assert store.lookup([1]).tokens.tolist() == [2]  # the continuation stops at the document end


def test_extra_buffer_lets_an_answer_copy_itself():
    store = TokenDatastore.build([[10, 11, 12]], UNLIMITED)
    generated = [20, 21, 22, 23, 20, 21]
    tree = store.lookup([5, *generated], extra=generated)
    assert tree.match_length == 2 and tree.sources == ("extra",)
    assert tree.path(len(tree) - 1) == [22, 23, 20, 21]
    limited = TokenDatastore(store.tokens, store.entries, DatastoreConfig(max_extra_tokens=2))
    assert limited.lookup(generated, extra=generated).match_length == 0


def test_limits_and_sampling():
    document = [1, 2] * 200 + [1, 3] * 100
    config = DatastoreConfig(max_query_tokens=4, max_depth=3, max_branches=1, max_occurrences=10)
    tree = TokenDatastore.build([document], config).lookup([1])
    assert tree.match_length == 1
    assert tree.total_occurrences == 300 and tree.num_occurrences == 10
    assert tree.depths.max() <= 3
    assert all(np.bincount(tree.parents + 1) <= 1)  # max_branches=1: a chain
    strict = DatastoreConfig(max_query_tokens=4, min_match_tokens=3)
    short = TokenDatastore.build([[1, 2, 3]], strict).lookup([9, 9, 2])
    assert len(short) == 0 and short.match_length == 1


def test_empty_inputs():
    store = TokenDatastore.build([[]])
    assert len(store.lookup([1, 2])) == 0
    assert len(TokenDatastore.build([]).lookup([1])) == 0
    assert len(TokenDatastore.build([[1, 2, 3]]).lookup([])) == 0


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="sequence of token-id sequences"):
        TokenDatastore.build([1, 2, 3])
    with pytest.raises(ValueError, match="document 1"):
        TokenDatastore.build([[1], [2, -5]])
    with pytest.raises(ValueError, match=">= 0"):
        TokenDatastore.build([[1, 2]]).lookup([1, -2])
    with pytest.raises(ValueError, match="max_depth"):
        DatastoreConfig(max_depth=0)
    with pytest.raises(ValueError, match="min_match_tokens"):
        DatastoreConfig(max_query_tokens=2, min_match_tokens=3)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 50, 2000), rng.integers(0, 50, 300)]
    store = TokenDatastore.build(documents)
    store.save(tmp_path / "ds")
    loaded = TokenDatastore.load(tmp_path / "ds")
    assert np.array_equal(loaded.tokens, store.tokens) and np.array_equal(loaded.entries, store.entries)
    assert loaded.num_documents == 2 and loaded.num_tokens == 2300
    for start in range(0, 2000, 97):
        query = documents[0][start : start + 6]
        assert tree_prefix_counts(loaded.lookup(query)) == tree_prefix_counts(store.lookup(query))


def rewrite_with_checksum(directory, name, array):
    """Replace an array file and fix its checksum, so only the structural checks can catch it."""
    np.save(directory / name, array, allow_pickle=False)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = file_sha256(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_json", "wrong_format", "missing"])
def test_damaged_files_are_refused(tmp_path, damage):
    directory = tmp_path / "ds"
    TokenDatastore.build([list(range(100))]).save(directory)
    tokens = directory / "tokens.npy"
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-40])
    elif damage == "flip":
        data = bytearray(tokens.read_bytes())
        data[-3] ^= 0xFF
        tokens.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (directory / "manifest.json").unlink()
    elif damage == "bad_json":
        (directory / "manifest.json").write_text("{not json")
    elif damage == "wrong_format":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["format"] = "rapid.chunk_index"
        (directory / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "missing":
        (directory / "entries.npy").unlink()
    with pytest.raises(DatastoreFormatError) as error:
        TokenDatastore.load(directory)
    assert str(directory) in str(error.value)


def test_inconsistent_arrays_are_refused(tmp_path):
    directory = tmp_path / "ds"
    store = TokenDatastore.build([[1, 2, 3, 4], [5, 6]])
    store.save(directory)
    broken = store.tokens.copy()
    broken[3] = -7  # a sentinel where a token was
    rewrite_with_checksum(directory, "tokens.npy", broken)
    with pytest.raises(DatastoreFormatError, match="tokens.npy"):
        TokenDatastore.load(directory)

    store.save(directory)
    rewrite_with_checksum(directory, "entries.npy", np.append(store.entries, 0).astype(store.entries.dtype))
    with pytest.raises(DatastoreFormatError, match="entries"):
        TokenDatastore.load(directory)

    store.save(directory)
    rewrite_with_checksum(directory, "entries.npy", store.entries.astype(np.float64))
    with pytest.raises(DatastoreFormatError, match="1-D"):
        TokenDatastore.load(directory)


def test_only_the_query_tail_is_read():
    store = TokenDatastore.build([list(range(50))], DatastoreConfig(max_query_tokens=4))
    long_query = [99] * 100_000 + [10, 11, 12]
    tree = store.lookup(long_query, extra=np.array(long_query))
    assert tree.match_length == 3 and tree.path(0) == [13]
    assert tree_prefix_counts(tree) == tree_prefix_counts(store.lookup(long_query[-4:]))
