"""Subset files: DataComp's u8,u8 format, order, duplicates, and round trips with DataComp-format files."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clipsift import ClipsiftError
from clipsift.filters import subset
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import (
    SUBSET_DTYPE,
    decode_uids,
    encode_uids,
    read_subset,
    sort_subset,
    subset_counts,
    subset_info,
    write_subset,
)
from clipsift.pipeline.pool import BASE_SCHEMA, Pool, derive_uid, finalize_pool, write_metadata

UIDS = [derive_uid(f"u{i}") for i in range(50)] + ["0" * 32, "f" * 32, "00000000000000010000000000000000"]


def datacomp_array(uids: list[str]) -> np.ndarray:
    """How DataComp's baselines build their files."""
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))


def test_encoding_is_datacomps() -> None:
    encoded = encode_uids(pa.array(["x" * 32] + UIDS).slice(1))  # an Arrow slice with an offset
    assert encoded.dtype == SUBSET_DTYPE == np.dtype("u8,u8")
    assert np.array_equal(encoded, datacomp_array(UIDS))
    assert decode_uids(encoded) == UIDS
    for bad in (["ABCDEF" + "0" * 26], ["0" * 31], ["g" * 32]):
        with pytest.raises(ClipsiftError, match="not 32 lowercase hex"):
            encode_uids(bad)


def test_written_subset_is_sorted_and_round_trips_with_datacomp_files(tmp_path: Path) -> None:
    uids = UIDS + UIDS[:3]  # duplicates are kept: they mean upsampling
    digest = write_subset(str(tmp_path / "ours.npy"), encode_uids(uids))
    raw = np.load(tmp_path / "ours.npy")
    assert raw.dtype == np.dtype("u8,u8") and len(raw) == len(uids)
    assert [tuple(r) for r in raw] == sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids)
    assert digest == hashlib.sha256((tmp_path / "ours.npy").read_bytes()).hexdigest()
    saved = io.BytesIO()
    np.save(saved, raw)
    assert saved.getvalue() == (tmp_path / "ours.npy").read_bytes()  # byte for byte what np.save writes
    # a DataComp baseline file: same dtype, fields f0/f1, order as they produced it
    np.save(tmp_path / "datacomp.npy", datacomp_array(list(reversed(uids))))
    theirs = read_subset(str(tmp_path / "datacomp.npy"))
    assert sorted(decode_uids(theirs)) == sorted(uids)
    named = np.array([(1, 2), (0, 5)], dtype=[("hi", "<u8"), ("lo", "<u8")])
    np.save(tmp_path / "named.npy", named)
    assert decode_uids(read_subset(str(tmp_path / "named.npy"))) == [
        "0000000000000001" + "0000000000000002",
        "0" * 16 + "0000000000000005",
    ]
    info = subset_info(str(tmp_path / "datacomp.npy"))
    assert (info.count, info.unique, info.duplicates, info.max_repeat, info.sorted) == (
        len(uids),
        len(UIDS),
        3,
        2,
        False,
    )
    assert subset_info(str(tmp_path / "ours.npy")).sorted


def test_counts_and_bad_files(tmp_path: Path) -> None:
    subset = np.sort(encode_uids(UIDS[:5] + UIDS[:2] + UIDS[:1]))
    assert subset_counts(subset, encode_uids(UIDS[:6])).tolist() == [3, 2, 1, 1, 1, 0]
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(ClipsiftError, match="is not a subset"):
        read_subset(str(tmp_path / "floats.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ClipsiftError, match="not a numpy .npy file"):
        read_subset(str(tmp_path / "junk.npy"))
    with pytest.raises(ClipsiftError, match="no such subset file"):
        read_subset(str(tmp_path / "none.npy"))


@pytest.mark.parametrize("case", ["random", "repeated", "shared_high_bits", "equal_f0", "tiny"])
def test_sort_subset_orders_by_both_words(case: str) -> None:
    rng = np.random.default_rng(len(case))
    n = {"tiny": 2, "random": 50_000}.get(case, 5_000)
    f0 = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    f1 = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    if case == "repeated":  # uids kept several times
        picks = rng.integers(0, n // 10, n)
        f0, f1 = f0[picks], f1[picks]
    if case == "shared_high_bits":  # f0 differing only in the bits below the packed row index
        f0 = (f0[rng.integers(0, 20, n)] & ~np.uint64(0xFFF)) | rng.integers(0, 0xFFF, n, dtype=np.uint64)
    if case == "equal_f0":
        f0[:] = f0[0]
    pairs = np.empty(n, SUBSET_DTYPE)
    pairs["f0"], pairs["f1"] = f0, f1
    expected = sorted(zip(f0.tolist(), f1.tolist()))
    assert list(zip(*(sort_subset(pairs)[name].tolist() for name in ("f0", "f1")))) == expected
    assert len(sort_subset(pairs[:0])) == 0 and sort_subset(pairs[:1]).tolist() == pairs[:1].tolist()


@pytest.mark.parametrize("case", ["random", "repeated", "one_bin", "empty"])
def test_a_subset_written_from_batches_equals_one_written_whole(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subset, "SORT_GROUP", 1_000)  # many groups of bins, each sorted on its own
    rng = np.random.default_rng(len(case))
    n = 0 if case == "empty" else 20_000
    pairs = rng.integers(0, 2**64 - 1, (n, 2), dtype=np.uint64, endpoint=True).view(SUBSET_DTYPE).reshape(n)
    if case == "repeated":
        pairs = pairs[rng.integers(0, n // 10, n)]
    if case == "one_bin":  # every uid in the same bin of top bits: one group larger than SORT_GROUP
        pairs["f0"] = (pairs["f0"] >> np.uint64(16)) | np.uint64(0xABCD << 48)
    batches = np.array_split(pairs, 7)
    count, sha = subset.write_subset_from(str(tmp_path / "streamed.npy"), lambda: iter(batches))
    assert (count, sha) == (n, write_subset(str(tmp_path / "whole.npy"), pairs))
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()


@pytest.mark.parametrize("held_bytes, calls", [(1 << 20, 1), (100_000, 2)])
def test_batches_that_fit_are_read_once_and_others_twice(
    held_bytes: int, calls: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of up to HELD_BYTES in all are kept between the two passes (one read of the pool's uids), larger
    ones read again; the file is the same either way."""
    monkeypatch.setattr(subset, "HELD_BYTES", held_bytes)
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 2**63, (20_000, 2), dtype=np.uint64).view(SUBSET_DTYPE).reshape(-1)  # 320,000 B
    made = []

    def batches():
        made.append(1)
        return iter(np.array_split(pairs, 9))

    assert subset.write_subset_from(str(tmp_path / "s.npy"), batches) == (
        len(pairs),
        write_subset(str(tmp_path / "whole.npy"), pairs),
    )
    assert len(made) == calls


def metadata_only_pool(root: Path, rows: int, shard_rows: int = 100_000) -> str:
    rng = np.random.default_rng(rows)
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        digits = rng.bytes(16 * n).hex()
        uids = pa.array([digits[i : i + 32] for i in range(0, 32 * n, 32)])
        table = pa.table({name: pa.nulls(n, field.type) for name, field in zip(BASE_SCHEMA.names, BASE_SCHEMA)})
        write_metadata(str(root), index, table.set_column(0, "uid", uids))
    finalize_pool(str(root), "memory", [{"kind": "test"}])
    return str(root)


def test_filtering_holds_the_subset_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20's goal: a process's memory grows by at most 24 B per added pool row; the subset itself is 16 B a
    kept uid. Every row is kept here, so the driver's numpy peak may grow 16 B a row, not the 48+ B of a
    concatenated copy of the kept uids plus the sort's copies."""
    monkeypatch.setattr(subset, "SORT_GROUP", 1 << 16)  # the sort's temporaries: fixed, as on a big pool
    monkeypatch.setattr(subset, "HELD_BYTES", 0)  # a big pool's subset is read twice, not held (at most 16 MiB)
    (tmp_path / "all.yaml").write_text("steps: [no_filter]\n")
    recipe = load_recipe(str(tmp_path / "all.yaml"))
    peaks = {}
    for rows in (300_000, 900_000):
        pool = metadata_only_pool(tmp_path / f"pool-{rows}", rows)
        tracemalloc.start()  # numpy's arrays are traced; Arrow's buffers (one shard at a time) are not
        result = apply_recipe(pool, recipe, str(tmp_path / f"all-{rows}.npy"), workers=1)
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.num_uids == rows
        assert np.array_equal(read_subset(result.subset), sort_subset(encode_uids(Pool(pool).uids())))
    growth = (peaks[900_000] - peaks[300_000]) / 600_000
    assert growth <= 20, f"the filter's peak grew {growth:.1f} B per added row (16 B: the subset itself)"


def test_reading_a_subset_holds_the_array_only(tmp_path: Path) -> None:
    """16 B a uid: the file is read into the array, not into a buffer of its bytes first (which made it 32 B)."""
    from clipsift.filters.subset import SUBSET_DTYPE, read_subset, write_subset

    pairs = np.zeros(1_000_000, SUBSET_DTYPE)
    pairs["f0"] = np.arange(len(pairs))
    write_subset(str(tmp_path / "s.npy"), pairs)
    tracemalloc.start()
    try:
        read = read_subset(str(tmp_path / "s.npy"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(read, pairs) and peak < 1.25 * pairs.nbytes


def test_is_sorted_looks_at_chunks_and_their_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """is_sorted compares a chunk at a time (no temporaries of the whole subset): an order broken at any place,
    a chunk's edge included, is found for every chunk size."""
    from clipsift.filters import subset as subset_module
    from clipsift.filters.subset import SUBSET_DTYPE, is_sorted, sort_subset

    rng = np.random.default_rng(9)
    pairs = np.zeros(30, SUBSET_DTYPE)
    pairs["f0"], pairs["f1"] = rng.integers(0, 5, 30), rng.integers(0, 4, 30)
    ordered = sort_subset(pairs)
    for chunk in (1, 2, 3, 29, 30, 1 << 20):
        monkeypatch.setattr(subset_module, "CHUNK", chunk)
        assert is_sorted(ordered) and is_sorted(ordered[:1]) and is_sorted(ordered[:0])
        for place in range(1, 30):
            if ordered[place] != ordered[place - 1]:
                swapped = ordered.copy()
                swapped[[place - 1, place]] = swapped[[place, place - 1]]
                assert not is_sorted(swapped), (chunk, place)
