"""Integer hashing shared by every layer: the random filter's draw, balance's draw, the shuffles' partitions.

It imports no other clipsift module. Its outputs are part of what clipsift computes (a `random` subset, a
partition's rows), so a change here changes results: keep it bit for bit.
"""

from __future__ import annotations

import numpy as np

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(values: np.ndarray | np.unsignedinteger) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea and Flood's mixer) of uint64 values, wrapping mod 2**64: a bijection in
    which every input bit moves every output bit, so its low bits (`% partitions`) and high bits (a uniform number)
    are both even. Other integer types are reinterpreted as uint64 first (int64 -1 is 2**64 - 1)."""
    x = np.asarray(values).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def row_hashes(words: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """A uint64 hash of each row of a [n, W] uint64 array (each row's `seeds` value folded in first), computed in
    place: memory for one hash a row and one temporary, whatever W is."""
    out = np.zeros(len(words), np.uint64) if seeds is None else np.asarray(seeds).astype(np.uint64)  # a copy
    with np.errstate(over="ignore"):
        for column in range(words.shape[1]):
            out ^= words[:, column]
            for shift, mix in ((30, _MIX1), (27, _MIX2)):
                out ^= out >> np.uint64(shift)
                out *= mix
            out ^= out >> np.uint64(31)
    return out
