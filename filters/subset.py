"""Subset files: DataComp's uid format, and the one home of the uid <-> (u8, u8) encoding.

A subset is a numpy structured array of dtype `u8,u8`: (int(uid[:16], 16), int(uid[16:], 16)),
sorted ascending and saved with np.save. A uid may appear more than once (it is then repeated when
resharding). DataComp's baseline files use the same dtype (fields f0, f1) and are read as they are.
"""

from __future__ import annotations

import binascii
import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError
from clipsift.files import file_sha256, open_fs, write_atomic

SUBSET_DTYPE = np.dtype("u8,u8")

_HEX_DIGITS = b"0123456789abcdef"


def encode_uids(uids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """uids (32 lowercase hex) -> structured `u8,u8` array, decoded in bulk from the Arrow string buffer
    (one bytes.translate to check the digits, one binascii.unhexlify)."""
    array = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(uids, pa.string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.string())
    array = array.cast(pa.string())
    if array.null_count:
        raise ClipsiftError(f"{array.null_count} uid(s) are missing (null); every row needs a 32-hex uid")
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
    if len(array) and not np.all(np.diff(offsets) == 32):
        raise ClipsiftError(f"uid {_first_bad(array)!r} is not 32 lowercase hex characters")
    data = bytes(memoryview(array.buffers()[2])[offsets[0] : offsets[-1]]) if len(array) else b""
    if data.translate(None, _HEX_DIGITS):
        raise ClipsiftError(f"uid {_first_bad(array)!r} is not 32 lowercase hex characters")
    words = np.frombuffer(binascii.unhexlify(data), ">u8")  # 16 bytes per uid, big-endian
    return words.astype(np.uint64).view(SUBSET_DTYPE).reshape(len(array))


def _first_bad(array: pa.Array) -> Any:
    for uid in array.to_pylist():
        if not (isinstance(uid, str) and len(uid) == 32 and all(c in "0123456789abcdef" for c in uid)):
            return uid
    return None


def decode_uids(pairs: np.ndarray) -> list[str]:
    """Structured `u8,u8` array -> uids (32 lowercase hex)."""
    pairs = as_subset_array(pairs, "uid array")
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(pairs["f0"], pairs["f1"])]


def as_subset_array(array: np.ndarray, source: str) -> np.ndarray:
    """A two-field unsigned 64-bit structured array with any field names, as SUBSET_DTYPE."""
    fields = array.dtype.fields
    if fields is None or len(fields) != 2 or any(array.dtype[i] != np.dtype("u8") for i in range(2)):
        raise ClipsiftError(
            f"{source}: dtype {array.dtype} is not a subset (expected a structured array of two uint64 fields, "
            "`u8,u8`)"
        )
    if array.dtype == SUBSET_DTYPE:
        return array.reshape(-1)
    names = array.dtype.names
    out = np.empty(array.shape, SUBSET_DTYPE)
    out["f0"], out["f1"] = array[names[0]], array[names[1]]
    return out.reshape(-1)


def sort_subset(pairs: np.ndarray) -> np.ndarray:
    """Sorted by (f0, f1). One value sort (numpy's SIMD kernel, several times faster than an argsort) of
    keys packing the high bits of f0 above each row's index; rows whose high bits are shared (repeated
    uids, or near-equal f0) are then put in order by a lexsort of just those rows."""
    pairs = as_subset_array(pairs, "uid array")
    if len(pairs) < 2:
        return pairs.copy()
    shift = np.uint64(int(len(pairs) - 1).bit_length())
    keys = pairs["f0"] >> shift  # in place from here on: fresh large arrays cost page faults
    keys <<= shift
    keys |= np.arange(len(pairs), dtype=np.uint64)
    keys.sort()
    high = keys >> shift
    shared = np.flatnonzero(high[1:] == high[:-1])
    del high
    keys &= (np.uint64(1) << shift) - np.uint64(1)
    order = keys.view(np.int64)
    if len(shared):
        tied = np.zeros(len(order), bool)
        tied[shared] = tied[shared + 1] = True
        rows = np.flatnonzero(tied)  # every position of each run of equal high bits
        runs = order[rows]
        order[rows] = runs[np.lexsort((pairs["f1"][runs], pairs["f0"][runs]))]
    return pairs[order]


def write_subset(url: str, pairs: np.ndarray) -> str:
    """Sort and save `pairs` with np.save, atomically; returns the file's sha256."""
    return _save_sorted(url, sort_subset(pairs))


BIN_BITS = 16  # uids are binned by the top bits of their first word before the in-memory sort
SORT_GROUP = 1 << 20  # uids sorted at a time: sort_subset's temporaries (24 B a uid) stay this small
HELD_BYTES = 16 << 20  # batches kept between the two passes while they fit (1M uids): then read only once


def write_subset_from(url: str, batches: Callable[[], Iterable[np.ndarray]]) -> tuple[int, str]:
    """Save the uids of all `batches()` (SUBSET_DTYPE arrays, e.g. a pool's kept uids shard by shard) as a sorted
    subset, atomically; returns (uids, the file's sha256). Holds the subset once, 16 B a uid, and no copy of it:
    a first pass counts the uids per bin of their top bits, the second puts each in its bin's place in the array,
    then runs of bins are sorted one at a time. `batches` is called twice, or once when all its batches fit in
    HELD_BYTES (they are kept for the second pass, and each is let go once placed)."""
    counts = np.zeros(1 << BIN_BITS, np.int64)
    held: list[np.ndarray] | None = []
    held_bytes = 0
    for batch in batches():
        counts += np.bincount(_bins(batch), minlength=len(counts))
        held_bytes += batch.nbytes
        if held is not None and held_bytes <= HELD_BYTES:
            held.append(batch)
        else:
            held = None  # too many to keep: the second pass reads them again
    ends = np.cumsum(counts)
    ordered = np.empty(int(ends[-1]), SUBSET_DTYPE)
    free = ends - counts  # the next free place of each bin
    for batch in _drained(held) if held is not None else batches():
        bins = _bins(batch)
        order = np.argsort(bins, kind="stable")
        per_bin = np.bincount(bins, minlength=len(counts))
        first = np.cumsum(per_bin) - per_bin  # where each bin starts in this batch's bin order
        placed = bins[order]
        ordered[free[placed] + np.arange(len(order)) - first[placed]] = batch[order]
        free += per_bin
    if not np.array_equal(free, ends):
        raise ClipsiftError("the uid batches changed between the two passes over them")
    cuts = np.flatnonzero(np.diff(ends // SORT_GROUP)) + 1  # whole bins per group, about SORT_GROUP uids each
    for start, stop in zip([0, *ends[cuts - 1].tolist()], [*ends[cuts - 1].tolist(), len(ordered)]):
        if stop - start > 1:
            ordered[start:stop] = sort_subset(ordered[start:stop])
    return len(ordered), _save_sorted(url, ordered)


def _drained(held: list[np.ndarray]) -> Iterable[np.ndarray]:
    """The held batches in order, each let go as it is handed out."""
    held.reverse()
    while held:
        yield held.pop()


def _bins(pairs: np.ndarray) -> np.ndarray:
    return (as_subset_array(pairs, "uid array")["f0"] >> np.uint64(64 - BIN_BITS)).astype(np.intp)


def _save_sorted(url: str, ordered: np.ndarray) -> str:
    fs, path = open_fs(url)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    digest = hashlib.sha256()

    def save(handle: Any) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(ordered))
        for part in (header.getbuffer(), memoryview(ordered).cast("B")):
            digest.update(part)
            handle.write(part)

    write_atomic(fs, path, save)
    return digest.hexdigest()


def read_subset(url: str) -> np.ndarray:
    """A subset file (ours or DataComp's) as a SUBSET_DTYPE array, in file order."""
    fs, path = open_fs(url)
    if not fs.exists(path):
        raise ClipsiftError(
            f"{url}: no such subset file; make one with `clipsift filter POOL --recipe R.yaml --out {url}`"
        )
    try:
        with fs.open(path, "rb") as handle:  # read into the array itself: the file's bytes are never held beside it
            array = np.load(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as err:  # MemoryError: a header claiming absurd sizes
        raise ClipsiftError(f"{url}: not a numpy .npy file ({type(err).__name__}: {err})") from err
    return as_subset_array(array, url)


def subset_counts(subset: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """How many times each of `pairs` appears in the sorted `subset` (int64 per pair)."""
    left = np.searchsorted(subset, pairs, side="left")
    right = np.searchsorted(subset, pairs, side="right")
    return (right - left).astype(np.int64)


def unique_counts(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct uids, how often each appears) of a sorted subset. A subset without repeats is returned as it is
    (no copy), with counts of one byte each."""
    if len(ordered) == 0:
        return ordered, np.zeros(0, np.int64)
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    if first.all():
        return ordered, np.ones(len(ordered), np.uint8)
    starts = np.flatnonzero(first)
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


CHUNK = 1 << 20  # subset entries looked at a time by passes over a whole subset: their temporaries stay this small


def first_entries(ordered: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Which entries of the sorted `ordered[start:stop]` are the first of their uid in the whole array."""
    chunk = ordered[start:stop]
    first = np.ones(len(chunk), bool)
    first[1:] = chunk[1:] != chunk[:-1]
    if start and len(chunk):
        first[0] = chunk[0] != ordered[start - 1]
    return first


def is_sorted(pairs: np.ndarray) -> bool:
    """Whether a SUBSET_DTYPE array is in (f0, f1) order (no copy; temporaries of one chunk)."""
    for start in range(0, max(len(pairs) - 1, 0), CHUNK):
        part = pairs[start : start + CHUNK + 1]  # one uid of overlap with the next chunk
        f0, f1 = part["f0"], part["f1"]
        if not np.all((f0[1:] > f0[:-1]) | ((f0[1:] == f0[:-1]) & (f1[1:] >= f1[:-1]))):
            return False
    return True


@dataclass
class SubsetInfo:
    path: str
    count: int
    unique: int
    duplicates: int  # entries beyond the first of each uid
    max_repeat: int
    sorted: bool
    sha256: str
    repeats: dict[int, int] = field(default_factory=dict)  # k -> how many uids appear k times


def subset_info(url: str) -> SubsetInfo:
    pairs = read_subset(url)
    in_order = is_sorted(pairs)  # as clipsift writes them: then no sorted copy is made
    ordered = pairs if in_order else sort_subset(pairs)
    _, counts = unique_counts(ordered)
    unique = len(counts)
    fs, path = open_fs(url)
    return SubsetInfo(
        url,
        len(pairs),
        unique,
        len(pairs) - unique,
        int(counts.max(initial=0)),
        in_order,
        file_sha256(fs, path),
        {k: int(n) for k, n in enumerate(np.bincount(counts)) if n},
    )
