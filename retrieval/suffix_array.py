"""Suffix array by prefix doubling in numpy: one O(T log T) sort per round, log2(longest repeat) rounds."""

import numpy as np


def suffix_array(seq: np.ndarray) -> np.ndarray:
    """Start positions [T] int64 of the suffixes of `seq` [T] (any integers) in sorted order.

    A suffix that is a proper prefix of another sorts first. Round r sorts the suffixes by their
    first 2^r symbols, using the ranks of round r - 1 as the key pair (rank[i], rank[i + 2^(r-1)]),
    and stops once all ranks differ.

    Worked example: "banana" as [1, 0, 2, 0, 2, 0]; sorted suffixes are a, ana, anana, banana,
    na, nana, i.e. start positions 5, 3, 1, 0, 4, 2:
    >>> suffix_array(np.array([1, 0, 2, 0, 2, 0])).tolist()
    [5, 3, 1, 0, 4, 2]
    """
    n = len(seq)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(np.asarray(seq), return_inverse=True)[1].astype(np.int64).reshape(-1)  # [T] in [0, T)
    order = np.argsort(rank, kind="stable")
    step = 1
    while rank.max() < n - 1:
        second = np.zeros(n, dtype=np.int64)  # rank of the suffix `step` further on, 0 = past the end
        second[: n - step] = rank[step:] + 1
        key = rank * (n + 1) + second  # < T * (T + 1): exact in int64 for T < 3e9
        order = np.argsort(key)
        sorted_key = key[order]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new_rank
        step *= 2
    return order
