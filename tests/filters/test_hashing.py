"""clipsift.hashing.splitmix64, the one mixer behind the random filter, balance's draws and the shuffles'
partitions: each user's hash checked bit for bit against a pure-Python splitmix64, so results stay as they were."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clipsift.filters.balance import _SALT, uniforms
from clipsift.filters.base import ShardData
from clipsift.filters.metadata import Random
from clipsift.hashing import splitmix64
from clipsift.pipeline.partition import hash_keys
from clipsift.pipeline.pool import derive_uid

MASK64 = (1 << 64) - 1


def mix(x: int) -> int:
    """splitmix64's finaliser on a Python int."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_splitmix64_is_the_published_mixer() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.integers(0, 2**63 - 1, 2000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)]
        + [np.array([0, 1, 2**63, 2**64 - 1], np.uint64)]
    )
    before = values.copy()
    assert [int(v) for v in splitmix64(values)] == [mix(int(v)) for v in values]
    assert np.array_equal(values, before)  # the input is left as it was
    # splitmix64 seeded with 0: its first two outputs (the mixer of 1 and 2 times the golden gamma)
    assert int(splitmix64(np.uint64(0x9E3779B97F4A7C15))) == 0xE220A8397B1DCDAF
    assert int(splitmix64(np.uint64(0x3C6EF372FE94F82A))) == 0x6E789E6AA1B965F4
    assert int(splitmix64(np.array([-1, 3], np.int64))[0]) == mix(MASK64)  # integers are read as uint64


def string_hash(value: bytes) -> int:
    """hash_keys of one string: from its length, each 8-byte little-endian word (zero-padded) mixed in, then mixed."""
    key = len(value)
    for start in range(0, len(value), 8):
        key = mix(key ^ int.from_bytes(value[start : start + 8].ljust(8, b"\0"), "little"))
    return mix(key)


def test_the_hashes_built_on_it_are_unchanged() -> None:
    texts = ["", "a", "abcdefgh", "abcdefghi", "naïve café", derive_uid("x")]
    assert [int(h) for h in hash_keys(pa.array([*texts, None]))] == [string_hash(t.encode()) for t in texts] + [0]
    assert [int(h) for h in hash_keys(pa.array([0, 5, -3], pa.int64()))] == [mix(0), mix(5), mix(2**64 - 3)]

    uids = [derive_uid(f"row/{n}") for n in range(50)]
    data = ShardData.in_memory(None, "00000000", pa.table({"uid": uids}))
    rows = np.arange(50) % 3 != 0
    keys = Random(fraction=0.5, seed=7)._keys(data, rows)
    assert [int(k) for k in keys] == [
        mix(int(u[:16], 16) ^ mix(int(u[16:], 16) ^ 7)) for u, kept in zip(uids, rows) if kept
    ]
    draws = uniforms(pa.array(uids), 3)
    salted = [mix(int(u[:16], 16) ^ mix(int(u[16:], 16) ^ mix(3 ^ int(_SALT)))) for u in uids]
    assert draws.tolist() == [(key >> 11) / 2.0**53 for key in salted]
