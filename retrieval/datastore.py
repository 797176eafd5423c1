"""`TokenDatastore`: longest-suffix lookup over a document's token ids, answering with a `RetrievalTree`.

Layout. The documents are stored as one int32 array with a unique negative sentinel before the
first and after every document, so no match crosses a document boundary:

    tokens = [-1] doc_0 [-2] doc_1 [-3] ... doc_{K-1} [-(K+1)]

An *entry* is a position p with a real token on each side (tokens[p - 1] >= 0 and tokens[p] >= 0):
the place right after an occurrence, where its continuation starts. Entries are sorted by their
left context read backwards, tokens[p - 1], tokens[p - 2], ... (the suffix array of the reversed
array). Then the entries whose left context ends with a pattern s_1 .. s_L (read backwards
s_L, ..., s_1) form one contiguous range, and extending the pattern by one more token to the left
only narrows that range. Matching the query's suffix, last token first, is therefore L rounds of
two binary searches, O(L log T) scalar steps, with no pass over the document.

Worked example: one document [7, 8, 9, 7, 8] gives tokens [-1, 7, 8, 9, 7, 8, -2] and entries
(continuation starts) 2, 3, 4, 5. Their backward left contexts are 7 -1 (p=2), 8 7 -1 (p=3),
9 8 7 -1 (p=4), 7 9 8 7 -1 (p=5), so the sorted entries are [2, 5, 3, 4]. The query [3, 7]:
its last token 7 narrows the range to entries [2, 5]; the next token back, 3, matches neither
(-1 and 9), so the longest matched suffix is [7], found twice, continuing [8, 9, 7, 8] and [8].

The tokens generated so far can be searched too (`extra`): that buffer is short and bounded,
so it is scanned by brute force (`scan_longest_suffix`, also the baseline in the benchmark).
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from retrieval.manifest import FormatError, manifest_field, read_manifest, write_manifest
from retrieval.suffix_array import suffix_array
from retrieval.trie import RetrievalTree, build_trie, empty_tree

FORMAT_NAME = "rapid.token_datastore"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.npy"
ENTRIES_FILE = "entries.npy"
MAX_TOKEN_ID = np.iinfo(np.int32).max


class DatastoreFormatError(FormatError):
    """A saved datastore that is corrupt, truncated or inconsistent."""


@dataclass(frozen=True)
class DatastoreConfig:
    max_query_tokens: int = 16  # n: the longest query suffix tried
    min_match_tokens: int = 1  # shorter matches give an empty tree
    max_depth: int = 8  # tokens of continuation per occurrence
    max_branches: int = 4  # children kept per trie node
    max_occurrences: int = 64  # occurrences the trie is built from (evenly sampled past this)
    max_extra_tokens: int = 4096  # the last tokens of `extra` that are scanned

    def __post_init__(self) -> None:
        for name in ("max_query_tokens", "min_match_tokens", "max_depth", "max_branches", "max_occurrences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_extra_tokens < 0:
            raise ValueError(f"max_extra_tokens must be >= 0, got {self.max_extra_tokens}")
        if self.min_match_tokens > self.max_query_tokens:
            raise ValueError(
                f"min_match_tokens={self.min_match_tokens} exceeds max_query_tokens={self.max_query_tokens}"
            )


@dataclass(frozen=True)
class SuffixMatch:
    """The longest matched query suffix and where its occurrences' continuations start."""

    length: int
    starts: np.ndarray  # [M] positions right after each occurrence (int32 or int64)


class TokenDatastore:
    def __init__(self, tokens: np.ndarray, entries: np.ndarray, config: DatastoreConfig) -> None:
        self.tokens = tokens  # [T + K + 1] int32, documents between negative sentinels
        self.entries = entries  # [E] int32/int64 continuation starts, sorted by backward left context
        self.config = config
        self._tokens_view = memoryview(tokens)  # scalar reads as Python ints, for the binary search
        self._entries_view = memoryview(entries)

    @property
    def num_documents(self) -> int:
        return int(np.count_nonzero(self.tokens < 0)) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) - self.num_documents - 1

    @classmethod
    def build(
        cls, documents: Sequence[Sequence[int] | np.ndarray], config: DatastoreConfig | None = None
    ) -> "TokenDatastore":
        """Index token-id documents (e.g. `[document_ids]`, or a document plus earlier outputs)."""
        if len(documents) and np.ndim(documents[0]) == 0:
            raise TypeError("documents must be a sequence of token-id sequences, e.g. [token_ids]")
        parts = [np.array([-1], dtype=np.int32)]
        for k, document in enumerate(documents):
            ids = np.asarray(document, dtype=np.int64).reshape(-1)
            if len(ids) and (ids.min() < 0 or ids.max() > MAX_TOKEN_ID):
                raise ValueError(f"document {k}: token ids must be in [0, {MAX_TOKEN_ID}]")
            parts += [ids.astype(np.int32), np.array([-(k + 2)], dtype=np.int32)]
        tokens = np.concatenate(parts)  # [T + K + 1]
        n = len(tokens)
        order = suffix_array(tokens[::-1])  # suffix of the reversed array at j = left context of n - j
        starts = n - order
        keep = starts < n
        starts = starts[keep]
        keep = (tokens[starts - 1] >= 0) & (tokens[starts] >= 0)
        entries = starts[keep].astype(np.int32 if n <= MAX_TOKEN_ID else np.int64)
        return cls(tokens, entries, config or DatastoreConfig())

    def longest_match(self, query: Sequence[int]) -> SuffixMatch:
        """Longest suffix of `query` (at most `max_query_tokens`) that occurs followed by a token."""
        tail = query_tail(query, self.config.max_query_tokens)
        tokens, entries = self._tokens_view, self._entries_view
        lo, hi, length = 0, len(entries), 0
        for back, token in enumerate(reversed(tail)):

            def key(p: int, back: int = back) -> int:
                return tokens[p - 1 - back]

            new_lo = bisect.bisect_left(entries, token, lo, hi, key=key)
            new_hi = bisect.bisect_right(entries, token, new_lo, hi, key=key)
            if new_lo == new_hi:
                break
            lo, hi, length = new_lo, new_hi, back + 1
        if length == 0:
            return SuffixMatch(0, np.zeros(0, dtype=np.int64))
        return SuffixMatch(length, self.entries[lo:hi])  # a view: no copy of a large match range

    def continuations(self, starts: np.ndarray) -> list[list[int]]:
        """The next `max_depth` tokens after each start, cut at the end of its document."""
        depth = self.config.max_depth
        positions = np.minimum(starts[:, None] + np.arange(depth), len(self.tokens) - 1)  # [M, depth]
        rows = self.tokens[positions]
        ends = np.where((rows < 0).any(axis=1), np.argmax(rows < 0, axis=1), depth)
        return [row[:end] for row, end in zip(rows.tolist(), ends.tolist(), strict=True)]

    def lookup(self, query: Sequence[int], extra: Sequence[int] | np.ndarray = ()) -> RetrievalTree:
        """Retrieval tree for the longest suffix of `query` found in the datastore or in `extra`.

        `query` is the recent context (question + generated so far); `extra` is a short buffer
        searched as well (the generated tokens, so an answer can copy from itself; only its last
        `max_extra_tokens` are scanned). The longer match wins; on a tie both sources count.
        Up to `max_occurrences` occurrences are used: the latest ones in `extra` first, then the
        datastore's, sampled evenly over the match range.
        """
        config = self.config
        stored = self.longest_match(query)
        buffer = np.asarray(extra[-config.max_extra_tokens :] if config.max_extra_tokens else [])
        buffer = buffer.astype(np.int64).reshape(-1)  # [<= max_extra_tokens]
        scanned = scan_longest_suffix(buffer, query, config.max_query_tokens)
        length = max(stored.length, scanned.length)
        if length < config.min_match_tokens:
            return replace(empty_tree(), match_length=length)
        use_extra, use_stored = scanned.length == length, stored.length == length
        extra_starts = scanned.starts[-config.max_occurrences :] if use_extra else scanned.starts[:0]
        continuations = [buffer[s : s + config.max_depth].tolist() for s in extra_starts.tolist()]
        if use_stored:
            continuations += self.continuations(
                sample_evenly(stored.starts, config.max_occurrences - len(continuations))
            )
        tree = build_trie(continuations, config.max_depth, config.max_branches)
        return replace(
            tree,
            match_length=length,
            total_occurrences=len(scanned.starts) * use_extra + len(stored.starts) * use_stored,
            sources=tuple(name for name, used in (("extra", use_extra), ("datastore", use_stored)) if used),
        )

    def save(self, directory: Path | str) -> None:
        """Write `tokens.npy`, `entries.npy` and then `manifest.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / TOKENS_FILE, self.tokens, allow_pickle=False)
        np.save(directory / ENTRIES_FILE, self.entries, allow_pickle=False)
        fields = {
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "num_entries": len(self.entries),
        }
        write_manifest(directory, FORMAT_NAME, FORMAT_VERSION, fields, [TOKENS_FILE, ENTRIES_FILE])

    @classmethod
    def load(cls, directory: Path | str, config: DatastoreConfig | None = None) -> "TokenDatastore":
        """Load a saved datastore (never rebuilt); a damaged one raises DatastoreFormatError."""
        directory = Path(directory)
        manifest = read_manifest(directory, FORMAT_NAME, FORMAT_VERSION, DatastoreFormatError)
        for name in (TOKENS_FILE, ENTRIES_FILE):
            if name not in manifest["files"]:
                raise DatastoreFormatError(directory / "manifest.json", f"does not list {name}")
        num_documents = manifest_field(manifest, "num_documents", int, directory, DatastoreFormatError)
        num_tokens = manifest_field(manifest, "num_tokens", int, directory, DatastoreFormatError)
        num_entries = manifest_field(manifest, "num_entries", int, directory, DatastoreFormatError)
        tokens = load_array(directory / TOKENS_FILE, (np.int32,))
        entries = load_array(directory / ENTRIES_FILE, (np.int32, np.int64))
        path = directory / TOKENS_FILE
        if len(tokens) != num_tokens + num_documents + 1 or len(tokens) == 0 or tokens[0] != -1:
            raise DatastoreFormatError(path, "length or first sentinel does not match the manifest")
        if np.count_nonzero(tokens < 0) != num_documents + 1 or tokens[-1] >= 0:
            raise DatastoreFormatError(path, f"does not hold {num_documents} documents between sentinels")
        path = directory / ENTRIES_FILE
        if len(entries) != num_entries:
            raise DatastoreFormatError(path, f"holds {len(entries)} entries, manifest says {num_entries}")
        if len(entries) and (entries.min() < 1 or entries.max() >= len(tokens) - 1):
            raise DatastoreFormatError(path, "an entry points outside the token array")
        if len(entries) and ((tokens[entries - 1] < 0) | (tokens[entries] < 0)).any():
            raise DatastoreFormatError(path, "an entry does not sit between two document tokens")
        return cls(tokens, entries, config or DatastoreConfig())


def query_tail(query: Sequence[int] | np.ndarray, max_tokens: int) -> list[int]:
    """The last `max_tokens` ids of `query` as Python ints, checked to be valid token ids."""
    tail = np.asarray(query[-max_tokens:], dtype=np.int64).reshape(-1).tolist()  # slice first: O(max_tokens)
    if any(t < 0 for t in tail):
        raise ValueError("query token ids must be >= 0")
    return tail


def scan_longest_suffix(
    sequence: Sequence[int] | np.ndarray, query: Sequence[int] | np.ndarray, max_query_tokens: int
) -> SuffixMatch:
    """Brute force: the longest suffix of `query` that occurs in `sequence` followed by a token.

    Every position of `sequence` is compared (O(T) per call, like vLLM's n-gram proposer), so use
    it only for short buffers. Worked example: sequence [1, 2, 3, 1, 2], query [9, 1, 2]: the
    suffix [1, 2] occurs at 0 and 3, but only the first is followed by a token, so the match is
    length 2 with continuation start 2.
    """
    seq = np.asarray(sequence, dtype=np.int64).reshape(-1)
    tail = query_tail(query, max_query_tokens)
    length = 0
    starts = np.zeros(0, dtype=np.int64)
    if len(seq) < 2 or not tail:
        return SuffixMatch(0, starts)
    candidates = np.flatnonzero(seq[:-1] == tail[-1]) + 1  # continuation starts after the last token
    for back, token in enumerate(reversed(tail)):
        if back:
            candidates = candidates[candidates - 1 - back >= 0]
            candidates = candidates[seq[candidates - 1 - back] == token]
        if len(candidates) == 0:
            break
        length, starts = back + 1, candidates
    return SuffixMatch(length, starts)


def sample_evenly(values: np.ndarray, count: int) -> np.ndarray:
    """`count` entries of `values` spread evenly from first to last (all of them if there are fewer)."""
    if len(values) <= count:
        return values
    return values[np.linspace(0, len(values) - 1, max(count, 0)).round().astype(np.int64)]


def load_array(path: Path, dtypes: tuple[type, ...]) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatastoreFormatError(path, f"not a readable .npy array ({e})") from e
    if array.ndim != 1 or array.dtype not in [np.dtype(d) for d in dtypes]:
        raise DatastoreFormatError(path, f"expected a 1-D {'/'.join(np.dtype(d).name for d in dtypes)} array")
    return np.ascontiguousarray(array)
