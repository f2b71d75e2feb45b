"""Exact order statistics over a pool too large to hold in memory.

`kth_smallest` finds the k-th smallest of unsigned integer keys streamed shard by shard: radix
passes of 16-bit histograms narrow the candidates until they fit in memory (at most
`max_candidates`), then one pass collects them and np.partition picks the answer. Memory stays
O(65536 + max_candidates) whatever the pool size; a pool that fits already takes a single pass.

Float scores map to unsigned keys that sort in the same order (`float_keys`: uint32 for float32,
uint64 for float64), so the DataComp threshold "score at rank int(N*f) of the whole pool sorted
descending" is computed exactly, at the scores' own precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

DIGIT_BITS = 16
MAX_CANDIDATES = 1 << 24  # 64 MiB of uint32 keys

KeyBatches = Callable[[], Iterable[np.ndarray]]


def float_keys(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 (float64 -> uint64) keys with the same order (-0.0 counts as 0.0). NaN is not allowed."""
    scores = np.asarray(scores)
    if scores.dtype != np.float64:
        scores = scores.astype(np.float32, copy=False)
    unsigned = np.uint64 if scores.dtype == np.float64 else np.uint32
    sign = unsigned(1) << unsigned(8 * scores.dtype.itemsize - 1)
    bits = (scores + scores.dtype.type(0.0)).view(unsigned)
    return np.where((bits & sign) != 0, ~bits, bits | sign)


def key_to_float(key: int, dtype: type = np.float32) -> float:
    """The inverse of float_keys for a key of `dtype` scores."""
    unsigned = np.uint64 if dtype == np.float64 else np.uint32
    key = unsigned(key)
    sign = unsigned(1) << unsigned(8 * np.dtype(unsigned).itemsize - 1)
    bits = key & ~sign if key & sign else ~key
    return float(np.array([bits], unsigned).view(dtype)[0])


def kth_smallest(
    batches: KeyBatches, k: int, bits: int, max_candidates: int = MAX_CANDIDATES, count: int | None = None
) -> int:
    """The k-th smallest (0-based) key of all batches; `batches()` is called once per pass
    (`count`, the number of keys, saves the counting pass when known)."""
    prefix, prefix_bits = 0, 0
    if count is None:
        count = sum(len(keys) for keys in batches())
    if not 0 <= k < count:
        raise ValueError(f"rank {k} outside 0..{count - 1}")
    while count > max_candidates and prefix_bits < bits:
        digit_bits = min(DIGIT_BITS, bits - prefix_bits)
        shift = bits - prefix_bits - digit_bits
        histogram = np.zeros(1 << digit_bits, np.int64)
        for keys in batches():
            keys = _with_prefix(keys, prefix, prefix_bits, bits)
            histogram += np.bincount(
                ((keys >> keys.dtype.type(shift)) & keys.dtype.type((1 << digit_bits) - 1)).astype(np.int64),
                minlength=1 << digit_bits,
            )
        cumulative = np.cumsum(histogram)
        digit = int(np.searchsorted(cumulative, k, side="right"))
        k -= int(cumulative[digit - 1]) if digit else 0
        count = int(histogram[digit])
        prefix, prefix_bits = (prefix << digit_bits) | digit, prefix_bits + digit_bits
    if prefix_bits == bits:
        return prefix
    candidates = np.concatenate([_with_prefix(keys, prefix, prefix_bits, bits) for keys in batches()])
    return int(np.partition(candidates, k)[k])


def _with_prefix(keys: np.ndarray, prefix: int, prefix_bits: int, bits: int) -> np.ndarray:
    if prefix_bits == 0:
        return keys
    return keys[(keys >> keys.dtype.type(bits - prefix_bits)) == keys.dtype.type(prefix)]


def top_fraction_threshold(
    score_batches: KeyBatches,
    num_rows: int,
    fraction: float,
    max_candidates: int = MAX_CANDIDATES,
    dtype: type = np.float32,
) -> float:
    """DataComp's threshold: the score at rank int(num_rows * fraction) of all rows sorted descending.

    `score_batches()` yields scores, NaN for rows without a score, compared at `dtype` (float32, or
    float64 for float64 columns); `num_rows` counts every row (scored or not). Rows without a score
    rank below every score. Returns -inf when the rank falls on such a row or past the end (then every
    scored row passes `score >= threshold`).
    """
    rank = int(num_rows * fraction)
    if rank >= num_rows:
        return float("-inf")
    dtype = np.float64 if dtype == np.float64 else np.float32

    def keys() -> Iterable[np.ndarray]:
        for scores in score_batches():
            scores = np.asarray(scores, dtype)
            yield float_keys(scores[~np.isnan(scores)])

    kept: list[np.ndarray] | None = []  # the first pass keeps the keys while they fit
    scored = 0
    for batch in keys():
        scored += len(batch)
        if kept is not None:
            kept.append(batch)
            if scored > max_candidates:
                kept = None
    ascending = num_rows - 1 - rank  # position counted from the bottom, unscored rows first
    unscored = num_rows - scored
    if ascending < unscored:
        return float("-inf")
    k = ascending - unscored
    if kept is not None:
        return key_to_float(int(np.partition(np.concatenate(kept), k)[k]), dtype)
    bits = 8 * np.dtype(dtype).itemsize
    return key_to_float(kth_smallest(keys, k, bits, max_candidates, count=scored), dtype)
