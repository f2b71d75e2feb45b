"""`clipsift reshard`: the subset's samples, copied byte for byte into new webdataset shards.

The output folder is itself a clipsift pool (pool.json, shards/, metadata/, checkable with
`clipsift pool check`) plus manifest.json, which `clipsift train` reads. Samples keep the pool's
order; a uid listed n times in the subset is written n times in a row, each copy under its own new
key. Images and captions are copied as stored (no re-encoding); metadata rows carry over with the
new key.

Plan: one pass over the pool's uid columns counts each row's copies, which fixes the global output
order; output shard j holds samples [j*S, (j+1)*S) of it, so every shard but the last is full. The
pass writes each input shard's kept rows and their copies to OUT/.plan/ (removed at the end), so the
subset is held by this process alone, once when it is sorted already. Each output shard is one Ray
task that reads the plans of the input shards overlapping its range and copies from their tars,
column-wise: no Python step per tar member (docs/pool-format.md, "How reshard moves bytes"); shards
already complete are skipped, so a killed reshard re-run writes only what is missing.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError, __version__
from clipsift.arrays import arrow_of
from clipsift.files import content_sha256, file_sha256, open_fs, write_atomic, write_json_atomic
from clipsift.filters import subset as subset_module
from clipsift.filters.subset import decode_uids, encode_uids, first_entries, is_sorted, read_subset, sort_subset
from clipsift.pipeline.pool import (
    Pool,
    PoolFormatError,
    ShardWriter,
    TarEntry,
    build_pool,
    image_member,
    image_spans,
)

MANIFEST_FORMAT = "clipsift-shards/1"
Segment = tuple[str, int, int]  # input shard, output copies of it to skip, copies to write


@dataclass
class ReshardResult:
    out: str
    manifest: str
    num_samples: int
    num_shards: int
    subset_uids: int
    missing_uids: int  # distinct subset uids that are not in the pool
    missing_examples: list[str]
    input_bytes: int
    seconds: float
    data_sha256: str = ""  # the manifest's content without its timestamp: the identity of this training data


def row_copies(ordered: np.ndarray, uids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(copies of each row, index into the sorted subset `ordered` of each matched row's first entry) for a shard's
    uid column: a uid listed n times (a weighted recipe's copies) gives its row n copies."""
    pairs = encode_uids(uids)
    first = np.searchsorted(ordered, pairs, side="left")
    at = np.minimum(first, max(len(ordered) - 1, 0))
    hit = (first < len(ordered)) & (ordered[at] == pairs) if len(ordered) else np.zeros(len(pairs), bool)
    copies = np.zeros(len(pairs), np.int64)  # most rows are not in the subset: only hits are searched again
    copies[hit] = np.searchsorted(ordered, pairs[hit], side="right") - first[hit]
    return copies, first[hit]


def missing_uids(ordered: np.ndarray, found: np.ndarray, examples: int = 5) -> tuple[int, np.ndarray]:
    """(how many distinct uids of the sorted subset no shard held, the first `examples` of them): `found` marks
    each matched uid's first entry; chunks at a time, no copy of the subset."""
    count, shown = 0, [ordered[:0]]
    for start in range(0, len(ordered), subset_module.CHUNK):
        stop = start + subset_module.CHUNK
        lost = np.flatnonzero(first_entries(ordered, start, stop) & ~found[start:stop])
        shown.append(ordered[start:stop][lost[: max(0, examples - count)]])
        count += len(lost)
    return count, np.concatenate(shown)


def plan_segments(totals: list[int], shards: list[str], shard_size: int) -> list[list[Segment]]:
    """Cut the concatenated output (shard i contributes totals[i] copies) into output shards of shard_size."""
    bounds = np.concatenate([[0], np.cumsum(totals, dtype=np.int64)])
    total = int(bounds[-1])
    plan = []
    for j in range(math.ceil(total / shard_size)):
        start, stop = j * shard_size, min((j + 1) * shard_size, total)
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        segments = []
        for i in range(first, len(shards)):
            if bounds[i] >= stop:
                break
            lo, hi = max(start, int(bounds[i])), min(stop, int(bounds[i + 1]))
            if hi > lo:
                segments.append((shards[i], lo - int(bounds[i]), hi - lo))
        plan.append(segments)
    return plan


PLAN_DIR = ".plan"  # in the output folder while it is written: each input shard's kept rows and their copies


def save_copies(out: str, shard: str, copies: np.ndarray) -> None:
    """Input shard `shard`'s kept rows and how often each is written, as (row, copies) uint32 pairs, for the tasks
    that copy from it: each task reads its own input shards' plans, none holds the subset."""
    rows = np.flatnonzero(copies)
    buffer = io.BytesIO()
    np.save(buffer, np.stack([rows, copies[rows]]).astype(np.uint32))
    fs, root = open_fs(out)
    fs.makedirs(f"{root}/{PLAN_DIR}", exist_ok=True)
    write_atomic(fs, f"{root}/{PLAN_DIR}/{shard}.npy", lambda handle: handle.write(buffer.getvalue()))


def load_copies(out: str, shard: str, num_rows: int) -> np.ndarray:
    """The copies of each of input shard `shard`'s rows (int64, zero for rows not kept)."""
    fs, root = open_fs(out)
    with fs.open(f"{root}/{PLAN_DIR}/{shard}.npy", "rb") as handle:
        rows, counts = np.load(io.BytesIO(handle.read())).astype(np.int64)
    copies = np.zeros(num_rows, np.int64)
    copies[rows] = counts
    return copies


@dataclass(frozen=True)
class _Fill:
    """Writes output shard `index` from its segments (a picklable callable for Ray tasks); the rows it copies come
    from the plan files in `out` (O(shard) per task, whatever the subset's size)."""

    pool_url: str
    out: str
    plan: list[list[Segment]]

    def __call__(self, index: int, writer: ShardWriter) -> None:
        pool = Pool(self.pool_url)
        for shard, skip, take in self.plan[index]:
            self._copy(pool, shard, skip, take, writer)

    def _copy(self, pool: Pool, shard: str, skip: int, take: int, writer: ShardWriter) -> None:
        """Write output copies [skip, skip + take) of input shard `shard`: the rows are taken from its metadata
        table column-wise, the images go to the writer as views of the input tar (a local one mapped whole)."""
        table = pool.metadata(shard)
        copies = load_copies(self.out, shard, table.num_rows)
        ends = np.cumsum(copies)  # output copies of this shard up to and including each row
        counts = np.clip(
            np.minimum(ends, skip + take) - np.maximum(ends - copies, skip), 0, None
        )  # copies written here
        wanted = np.flatnonzero(counts)
        if not len(wanted):
            return
        with pool.mapped_tar(shard) as mapped:
            spans = image_spans(mapped, pool.tar_path(shard)) if mapped is not None else None
            if (
                spans is not None
                and len(spans.keys) == table.num_rows
                and spans.keys.take(arrow_of(wanted)).equals(
                    table.column("key").take(arrow_of(wanted)).combine_chunks().cast(pa.binary())
                )
            ):
                view = memoryview(mapped)
                images = [
                    (_JPEG.get(spans.exts[row], spans.exts[row]), view[offset : offset + size])
                    for row, offset, size in zip(
                        wanted.tolist(), spans.offsets[wanted].tolist(), spans.sizes[wanted].tolist()
                    )
                ]
                repeats = counts[wanted]
                writer.write_rows(
                    table.take(arrow_of(np.repeat(wanted, repeats))), list(_repeat(images, repeats.tolist()))
                )
                del images, view  # so that the map can close
                return
        self._copy_windows(pool, shard, table, wanted, counts, writer)

    def _copy_windows(
        self, pool: Pool, shard: str, table: pa.Table, wanted: np.ndarray, counts: np.ndarray, writer: ShardWriter
    ) -> None:
        """`_copy` for any tar (another filesystem, pax headers, ...): the tar read a window at a time."""
        keys = table.column("key").take(arrow_of(wanted)).to_pylist()
        source = pool.tar_path(shard)
        done, seen = 0, 0  # wanted rows written; entries of the tar passed
        for window in pool.entry_windows(shard):
            stop = int(np.searchsorted(wanted, seen + len(window)))
            if stop > done:
                rows = wanted[done:stop]
                images = [
                    _image(window[position - seen], key, position, source)
                    for position, key in zip(rows.tolist(), keys[done:stop])
                ]
                repeats = counts[rows]
                writer.write_rows(
                    table.take(arrow_of(np.repeat(rows, repeats))), list(_repeat(images, repeats.tolist()))
                )  # written now
            done, seen = stop, seen + len(window)
            if done == len(wanted):
                return
        raise PoolFormatError(f"{source}: the tar ends before sample {int(wanted[-1])} that the metadata lists")


_JPEG = {"jpeg": "jpg"}  # written as .jpg, as Sample does


def _image(entry: TarEntry, key: str, position: int, source: str) -> tuple[str, bytes | memoryview]:
    """The (extension, data) of a sample's image, after checking that the tar entry is the metadata row's."""
    if entry.key != key:
        raise PoolFormatError(
            f"{source}: sample {position} has key {entry.key!r} but the metadata says {key!r}; "
            "the shard is misaligned, run `clipsift pool check`"
        )
    image = image_member(entry)
    if image is None:
        raise PoolFormatError(f"{source}: sample {entry.key!r} has no image member (.jpg/.png/.webp)")
    return _JPEG.get(image[0], image[0]), image[1]


def _repeat(items: list[Any], counts: list[int]) -> Iterator[Any]:
    for item, count in zip(items, counts):
        yield from itertools.repeat(item, count)


def reshard(
    pool_url: str,
    subset_path: str,
    out: str,
    *,
    shard_size: int = 10_000,
    workers: int | None = None,
    address: str | None = None,
) -> ReshardResult:
    """Write the subset's samples of `pool_url` as training shards in `out`, plus out/manifest.json."""
    started = time.perf_counter()
    if shard_size < 1:
        raise ClipsiftError(f"--shard-size must be at least 1, got {shard_size}")
    pool = Pool(pool_url)
    info = pool.info
    subset = read_subset(subset_path)
    num_uids = len(subset)
    ordered = subset if is_sorted(subset) else sort_subset(subset)  # held as it is (16 B an entry) when sorted
    del subset
    shards = pool.shard_ids()
    _remove_stale_temporaries(out)
    # a pool may hold a uid on several rows (a reshard of a weighted subset): its rows are all written
    totals, found, uids_may_repeat = [], np.zeros(len(ordered), bool), bool(info.get("uids_may_repeat"))
    for shard in shards:  # the one pass that holds the subset: each input shard's copies go to a plan file
        copies, matched = row_copies(ordered, pool.metadata(shard, ["uid"]).column("uid"))
        totals.append(int(copies.sum()))
        found[matched] = True
        uids_may_repeat |= bool(np.any(copies > 1))
        if totals[-1]:
            save_copies(out, shard, copies)
    plan = plan_segments(totals, shards, shard_size)
    num_missing, examples = missing_uids(ordered, found)
    missing_examples = decode_uids(examples)
    del ordered, found
    subset_fs, subset_file = open_fs(subset_path)
    subset_sha = file_sha256(subset_fs, subset_file)
    pool_sha = file_sha256(pool.fs, pool.path("pool.json"))
    source = {
        "kind": "reshard",
        "pool": pool.url,
        "pool_json_sha256": pool_sha,
        "subset": subset_path,
        "subset_sha256": subset_sha,
    }
    params = {**source, "shard_size": shard_size, "sources": [source]}
    written = build_pool(
        out,
        name=f"{info.get('name', 'pool')}-subset",
        params=params,
        num_shards=len(plan),
        fill=_Fill(pool.url, out, plan),
        desc="reshard",
        workers=workers,
        address=address,
        threads=True,  # mapping, scanning and writing tars: NumPy, Arrow and writev, mostly outside the GIL
        uids_may_repeat=uids_may_repeat,
    )
    fs, root = open_fs(out)
    if fs.exists(f"{root}/{PLAN_DIR}"):
        fs.rm(f"{root}/{PLAN_DIR}", recursive=True)
    result_pool = Pool(out)
    manifest = {
        "format": MANIFEST_FORMAT,
        "pool": pool.url,
        "pool_json_sha256": pool_sha,
        "subset": subset_path,
        "subset_sha256": subset_sha,
        "subset_uids": num_uids,
        "missing_uids": num_missing,
        "num_samples": written["num_samples"],
        "num_shards": written["num_shards"],
        "shard_size": shard_size,
        "shards": [
            {"path": f"shards/{s}.tar", "num_samples": result_pool.num_rows(s)} for s in result_pool.shard_ids()
        ],
        "clipsift_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(fs, f"{root}/manifest.json", manifest)
    input_bytes = sum(pool.fs.size(pool.tar_path(s)) for s in shards)
    return ReshardResult(
        out,
        f"{root}/manifest.json",
        written["num_samples"],
        written["num_shards"],
        num_uids,
        num_missing,
        missing_examples,
        input_bytes,
        time.perf_counter() - started,
        content_sha256(manifest),
    )


def _remove_stale_temporaries(out: str) -> None:
    """Temporary files left by a killed run (a clean failure removes its own)."""
    fs, root = open_fs(out)
    for pattern in ("shards/*.tmp-*", "metadata/*.tmp-*", f"{PLAN_DIR}/*.tmp-*", "*.tmp-*"):
        for path in fs.glob(f"{root}/{pattern}"):
            fs.rm(path)


def read_manifest(shards_dir: str) -> dict[str, Any]:
    """The manifest of a reshard output folder (for `clipsift train`)."""
    import json

    fs, root = open_fs(shards_dir)
    path = f"{root}/manifest.json"
    if not fs.exists(path):
        raise ClipsiftError(
            f"{shards_dir}: no manifest.json; make the shards with `clipsift reshard POOL --subset S --out "
            f"{shards_dir}`"
        )
    with fs.open(path, "rb") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ClipsiftError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def reshard_summary_rows(result: ReshardResult) -> list[tuple[str, object]]:
    rate = result.input_bytes / 1e6 / result.seconds if result.seconds else 0.0
    rows: list[tuple[str, object]] = [
        ("shards", f"{result.out} ({result.num_shards:,} shards)"),
        ("samples", result.num_samples),
        ("subset uids", result.subset_uids),
        (
            "missing from the pool",
            result.missing_uids
            if not result.missing_uids
            else f"{result.missing_uids:,} distinct uids, e.g. {', '.join(result.missing_examples)}",
        ),
        ("manifest", result.manifest),
        ("time", f"{result.seconds:.1f} s ({rate:,.0f} MB/s of input tars)"),
    ]
    return rows
