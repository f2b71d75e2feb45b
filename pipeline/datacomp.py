"""A DataComp download as a pool, without re-downloading: `clipsift pool from-datacomp`.

DataComp's download is img2dataset output (webdataset tars whose sample .json carry the uid, with
img2dataset's per-shard parquet beside each tar) plus their metadata parquets (uid, url, text,
original_width, original_height, sha256, clip_b32_similarity_score, clip_l14_similarity_score,
face_bboxes), each with an optional .npz of CLIP features in the same row order (`b32_img`,
`b32_txt`, `l14_img`, `l14_txt`).

- Each tar (sorted) becomes one pool shard and is referenced, not copied: hard-linked, symlinked when
  it lies on another filesystem, copied only when the pool is not on the local disk. A tar with
  unusable samples (no image or caption, a repeated uid) is rewritten without them, bytes unchanged.
- Each sample's metadata row is theirs, joined by uid: url, original sizes, similarity scores,
  face_bboxes, their sha256 as `source_sha256`; `text` is the tar's caption and `sha256` that of the
  stored image.
- Their features become POOL/embeddings/ViT-L-14__openai and ViT-B-32__openai (the OpenAI weights
  they were computed with), rows in each shard's metadata order, their float16 values unchanged (not
  re-normalised: DataComp's image-based baseline reads them as they are), clip_score the float32
  cosine of the image and text features, so the baseline filters run from the published features,
  no GPU. The CLIP-score baselines read DataComp's own score columns instead (filters/clip.py).
- Metadata rows missing from the tars (dead links) are left out and reported:
  POOL/download_status/datacomp.parquet gives every metadata row a status (ok, the failure
  img2dataset recorded, or missing). Their rows, all of their columns, are kept in POOL/absent/
  (one parquet per metadata file): DataComp's baselines are defined over every metadata row (the
  CLIP-score fraction's N and threshold count dead links), and the filters read them from there.
- Samples whose caption is blank are adopted: DataComp's baselines keep them (no_filter does).
- No process holds every uid. Tar samples meet their metadata rows in a hash-partitioned join (the metadata's
  uids and each tar's listed uids, from img2dataset's parquet beside it, or its samples when it has none), and
  each metadata row's status, the dead links and uids held by two tars come from a second partitioned pass (the
  metadata, the pool's shards and img2dataset's records): pipeline/partition.py, in POOL/download/from-datacomp/
  until the pool is done.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift import ClipsiftError, __version__
from clipsift.files import (
    is_local_fs,
    open_fs,
    parquet_file,
    read_parquet,
    write_atomic,
    write_json_atomic,
    write_parquet,
)
from clipsift.pipeline.download import (
    StatusSummary,
    concat_status,
    place_img2dataset_shard,
    placed_tars,
    sample_status,
    scan_img2dataset_tar,
    status_summary_rows,
    status_table,
    summarize_pool_status,
)
from clipsift.pipeline.importer import is_tar_name, list_files
from clipsift.pipeline.partition import (
    Shuffle,
    first_occurrence,
    hash_keys,
    map_group,
    partitions_for,
    position,
    read_batch,
    source_rows,
)
from clipsift.pipeline.pool import (
    Pool,
    embeddings_table,
    finalize_pool,
    record_build_params,
    shard_id,
    shard_is_complete,
)
from clipsift.pipeline.pool.layout import ABSENT_DIR

FEATURE_MODELS = {"l14": "ViT-L-14__openai", "b32": "ViT-B-32__openai"}  # npz key prefix -> embeddings model_id
METADATA_BASE = ("uid", "url", "text", "original_width", "original_height", "sha256")  # not carried as they are
WORK_DIR = "download/from-datacomp"  # POOL/download/from-datacomp/: the uid passes' files, removed at the end
MISSING = ("missing", "not in the shards: not downloaded, or a dead link")


# --------------------------------------------------------------------------- their metadata and features


@dataclass(frozen=True)
class _Metadata:
    """DataComp's metadata parquets, the .npz beside each, and their row counts (no row is held here: uids are
    matched by partitioned passes, each sample's row read by its shard's task)."""

    files: tuple[str, ...]
    features: tuple[str | None, ...]
    counts: tuple[int, ...]  # rows of each file
    dims: dict[str, int]  # feature prefix (l14, b32) -> dimension
    carried_types: dict[str, pa.DataType]  # their columns carried into the pool's metadata

    def locate(self, position: int) -> tuple[int, int]:
        """(file, row) of a position (pipeline/partition.py's: the file's number above the row's)."""
        return int(position) >> 32, int(source_rows(np.int64(position)))

    def rows(self, positions: list[int | None]) -> list[dict[str, Any] | None]:
        """Their metadata row at each position (None stays None)."""
        found: list[dict[str, Any] | None] = [None] * len(positions)
        for file, pairs in _by_file(self, positions).items():
            table = _metadata_table(self.files[file]).take([row for _, row in pairs]).to_pylist()
            for (i, _), row in zip(pairs, table):
                found[i] = row
        return found

    def embeddings(self, prefix: str, uids: list[str], positions: list[int | None]) -> pa.Table:
        """An embeddings table for these samples from their `prefix` features; rows without features say why."""
        dim = self.dims[prefix]
        image, text = np.zeros((len(uids), dim), np.float32), np.zeros((len(uids), dim), np.float32)
        status = ["uid not in the DataComp metadata"] * len(uids)
        for file, pairs in _by_file(self, positions).items():
            npz = self.features[file]
            if npz is None or f"{prefix}_img" not in _npz_shapes(npz) or f"{prefix}_txt" not in _npz_shapes(npz):
                reason = f"no {prefix} features for {os.path.basename(self.files[file])}"
                for i, _ in pairs:
                    status[i] = reason
                continue
            index, rows = [i for i, _ in pairs], [row for _, row in pairs]
            image[index] = _npz_array(npz, f"{prefix}_img")[rows]
            text[index] = _npz_array(npz, f"{prefix}_txt")[rows]
            for i in index:
                status[i] = "ok"
        return embeddings_table(uids, image, text, status, normalise=False)  # theirs bit for bit: unit length


def _by_file(meta: _Metadata, positions: list[int | None]) -> dict[int, list[tuple[int, int]]]:
    """{file: [(index in `positions`, row in that file)]} for the positions that are not None."""
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, at in enumerate(positions):
        if at is not None:
            file, row = meta.locate(at)
            groups[file].append((i, row))
    return groups


@functools.lru_cache(maxsize=2)
def _metadata_table(path: str) -> pa.Table:
    fs, local = open_fs(path)
    return read_parquet(fs, local)


@functools.lru_cache(maxsize=4)
def _npz_array(path: str, key: str) -> np.ndarray:
    fs, local = open_fs(path)
    with fs.open(local, "rb") as handle, np.load(handle) as npz:
        return npz[key]


@functools.cache
def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an .npz, read from the array headers only."""
    fs, local = open_fs(path)
    shapes = {}
    try:
        with fs.open(local, "rb") as handle, zipfile.ZipFile(handle) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as array:
                        major, _ = np.lib.format.read_magic(array)
                        read = (
                            np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                        )
                        shapes[member[: -len(".npy")]] = read(array)[0]
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ClipsiftError(
            f"{path}: not a readable .npz of features ({err}); replace it or move it out of the metadata folder"
        ) from err
    return shapes


def _url(fs: Any, path: str) -> str:
    """A path that open_fs maps back to (fs, path): plain for local files."""
    return path if is_local_fs(fs) else fs.unstrip_protocol(path)


def _open_metadata(metadata: str) -> _Metadata:
    fs, root = open_fs(os.path.abspath(metadata) if "://" not in metadata else metadata)
    if not fs.isdir(root):
        raise ClipsiftError(f"{metadata}: not a folder; --metadata is the folder of DataComp's metadata parquets")
    files = [path for path in sorted(fs.glob(f"{root}/*.parquet")) if not _is_img2dataset_parquet(fs, path)]
    if not files:
        raise ClipsiftError(
            f"{metadata}: no .parquet files; --metadata is the folder of DataComp's metadata parquets "
            "(uid, url, text, ... as their download_upstream.py fetched them)"
        )
    schema = parquet_file(fs, files[0]).schema_arrow
    missing = [c for c in ("uid", "url") if c not in schema.names]
    if missing:
        raise ClipsiftError(
            f"{files[0]}: no {' or '.join(missing)} column; DataComp metadata parquets have uid, url, text, ... "
            f"(this one has {', '.join(schema.names)})"
        )
    counts, features = [], []
    for path in files:
        counts.append(parquet_file(fs, path).metadata.num_rows)
        npz = path[: -len(".parquet")] + ".npz"
        features.append(_check_npz(_url(fs, npz), counts[-1]) if fs.exists(npz) else None)
    dims = _feature_dims([f for f in features if f])
    carried = {name: schema.field(name).type for name in schema.names if name not in METADATA_BASE}
    return _Metadata(
        tuple(_url(fs, f) for f in files),
        tuple(features),
        tuple(counts),
        dims,
        {**carried, "source_sha256": pa.string()},
    )


def _is_img2dataset_parquet(fs: Any, path: str) -> bool:
    """img2dataset's per-shard parquet (beside its tar), when --metadata and --shards are one folder."""
    return fs.exists(path[: -len(".parquet")] + ".tar")


def _check_npz(npz: str, num_rows: int) -> str:
    for key, shape in _npz_shapes(npz).items():
        if len(shape) != 2 or shape[0] != num_rows:
            raise ClipsiftError(
                f"{npz}: {key} has shape {shape} but its parquet has {num_rows} rows; the features must be one "
                "row per metadata row, in the same order"
            )
    return npz


def _feature_dims(npzs: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for npz in npzs:
        shapes = _npz_shapes(npz)
        for prefix in FEATURE_MODELS:
            if f"{prefix}_img" in shapes and f"{prefix}_txt" in shapes:
                dim = shapes[f"{prefix}_img"][1]
                if dims.setdefault(prefix, dim) != dim or shapes[f"{prefix}_txt"][1] != dim:
                    raise ClipsiftError(
                        f"{npz}: {prefix} features have dimension {shapes[f'{prefix}_img'][1]}/"
                        f"{shapes[f'{prefix}_txt'][1]}, other files {dims[prefix]}"
                    )
    return dims


# --------------------------------------------------------------------------- one shard


def _merge(row: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Their metadata into a sample's row: theirs wins, except text (the tar's) and sha256 (the stored image's)."""
    row["url"] = theirs.get("url") or row["url"]
    if theirs.get("original_width") and theirs.get("original_height"):
        row["original_width"], row["original_height"] = theirs["original_width"], theirs["original_height"]
    if theirs.get("sha256"):
        row["source_sha256"] = theirs["sha256"]
    row.update({k: v for k, v in theirs.items() if k not in METADATA_BASE})


@dataclass(frozen=True)
class _DatacompShard:
    """Makes pool shard `index` from the index-th tar (a picklable callable for Ray tasks)."""

    out: str
    shards_root: str
    tars: tuple[str, ...]
    meta: _Metadata
    index: Shuffle  # the uid index: destination i holds (uid, metadata position) of the i-th tar's listed uids

    def __call__(self, index: int) -> None:
        fs, _ = open_fs(self.shards_root)
        rel = self.tars[index]
        tar = f"{self.shards_root}/{rel}"
        rows, skipped = scan_img2dataset_tar(fs, tar, rel)
        uids = [row["uid"] for row in rows]
        found = self.index.read(index)
        lookup = dict(zip(found.column("uid").to_pylist(), found.column("meta").to_pylist()))
        positions = [lookup.get(uid) for uid in uids]
        for row, theirs in zip(rows, self.meta.rows(positions)):
            if theirs is not None:
                _merge(row, theirs)
        for prefix in self.meta.dims:  # embeddings first: a complete shard has them
            Pool(self.out).write_embeddings(
                FEATURE_MODELS[prefix], shard_id(index), self.meta.embeddings(prefix, uids, positions)
            )
        stats = {"source": rel, "not_in_metadata": positions.count(None)}
        place_img2dataset_shard(self.out, index, _url(fs, tar), rows, skipped, stats, self.meta.carried_types)


# --------------------------------------------------------------------------- the stage


@dataclass
class DatacompResult:
    out: str
    metadata: str
    shards: str
    info: dict[str, Any]
    summary: StatusSummary  # one row per metadata row
    placed: dict[str, int]  # how the tars got into the pool -> shards
    not_in_metadata: int  # samples of the tars whose uid the metadata does not list (kept)
    skipped: int  # samples of the tars that could not be used (see the shard stats)
    models: list[str]  # embeddings written from their features


def from_datacomp(
    metadata: str, shards: str, out: str, *, workers: int | None = None, name: str | None = None
) -> DatacompResult:
    """Make the pool `out` from DataComp's metadata folder and img2dataset shards folder (see the module docstring).

    Re-running continues where a killed run stopped: complete shards are kept.
    """
    from clipsift.pipeline.parallel import map_shards

    meta = _open_metadata(metadata)
    shards_fs, shards_root = open_fs(os.path.abspath(shards) if "://" not in shards else shards)
    if not shards_fs.isdir(shards_root):
        raise ClipsiftError(f"{shards}: not a folder; --shards is the folder of DataComp's img2dataset .tar shards")
    tars = tuple(rel for rel in list_files(shards_fs, shards_root) if is_tar_name(rel))
    if not tars:
        raise ClipsiftError(f"{shards}: no .tar files; --shards is the folder of DataComp's img2dataset .tar shards")
    shards_url = _url(shards_fs, shards_root)
    sources = [
        {
            "kind": "datacomp",
            "metadata": os.path.dirname(meta.files[0]),
            "shards": shards_url,
            "num_metadata_files": len(meta.files),
            "num_tars": len(tars),
        }
    ]
    record_build_params(out, {"kind": "from-datacomp", "sources": sources})
    fs, root = open_fs(out)
    work = f"{_url(fs, root)}/{WORK_DIR}"
    rows = sum(meta.counts)
    # sources of several kinds: the largest is a metadata file or a tar (its rows: about the pool's a tar)
    largest = max([*meta.counts, rows / max(len(tars), 1)])
    todo = [i for i in range(len(tars)) if not shard_is_complete(out, i)]
    if todo:  # their rows by uid, for each tar: a partitioned join of the metadata's and the tars' uids
        inputs = len(meta.files) + len(tars)
        index = Shuffle(
            f"{work}/index",
            inputs,
            partitions_for(2 * rows, ROW_BYTES),
            len(tars),
            map_group(inputs, largest, ROW_BYTES),
        )
        listing = _UidListing(meta, shards_url, tars, index.partitions)
        index.run(listing, _JoinUids(len(meta.files)), desc="DataComp uids", workers=workers)
        shard = _DatacompShard(out, shards_url, tars, meta, index)
        map_shards(shard, todo, desc="adopt DataComp shards", workers=workers)
    shard_ids = tuple(Pool(out).shard_ids())
    sources_count = len(meta.files) + len(shard_ids) + len(tars)
    status = Shuffle(
        f"{work}/status",
        sources_count,
        partitions_for(3 * rows, ROW_BYTES),
        len(meta.files) + 1,
        map_group(sources_count, largest, ROW_BYTES),
    )
    evidence = _Evidence(out, meta, shard_ids, shards_url, tars, status.partitions)
    status.run(evidence, _Statuses(len(meta.files)), desc="DataComp status", workers=workers)
    _check_no_repeats(status, len(meta.files))
    _write_manifests(out, meta)
    map_shards(_FileStatus(out, meta, status, f"{work}/parts"), range(len(meta.files)), desc="status", workers=workers)
    concat_status(out, "datacomp", [f"{work}/parts/{i:05d}.parquet" for i in range(len(meta.files))])
    Shuffle(work, 0, 0, 0).remove()
    summary = summarize_pool_status(out)
    models = [FEATURE_MODELS[p] for p in meta.dims]
    info = finalize_pool(
        out,
        name or os.path.basename(shards_root.rstrip("/")),
        sources,
        datacomp={**summary.as_dict(), "embeddings": models},
    )
    pool = Pool(out)
    not_in_metadata = skipped = 0
    for shard in pool.shard_ids():  # one shard's stats at a time: they list each skipped sample
        stats = pool.shard_stats(shard)
        not_in_metadata += stats.get("not_in_metadata", 0)
        skipped += len(stats.get("skipped", []))
    return DatacompResult(
        out,
        sources[0]["metadata"],
        sources[0]["shards"],
        info,
        summary,
        placed_tars(out),
        not_in_metadata,
        skipped,
        models,
    )


def _write_manifests(out: str, meta: _Metadata) -> None:
    """Where each embeddings folder came from: DataComp's features, not `clipsift score`."""
    pool = Pool(out)
    for prefix, dim in meta.dims.items():
        model_id = FEATURE_MODELS[prefix]
        shards = [s for s in pool.shard_ids() if pool.has_embeddings(model_id, s)]
        write_json_atomic(
            pool.embeddings_fs,
            f"{pool.embeddings_folder(model_id)}/manifest.json",
            {
                "model": {"model_id": model_id, "weights": "openai", "dim": dim},
                "source": f"DataComp's published features ({prefix}_img, {prefix}_txt in the .npz beside their "
                "metadata parquets)",
                "metadata": os.path.dirname(meta.files[0]),
                "shards": len(shards),
                "rows": sum(pool.embeddings_rows(model_id, s) for s in shards),
                "clipsift_version": __version__,
            },
        )


def _check_no_repeats(status: Shuffle, files: int) -> None:
    """No uid in two tars: counted a partition at a time (one example kept)."""
    repeated, example = 0, None
    for partition in range(status.partitions):
        uids = read_batch(status.reduce_path(partition), files).column("uid")
        repeated += len(uids)
        example = example or (uids[0].as_py() if len(uids) else None)
    if repeated:
        raise ClipsiftError(
            f"{repeated} uids are in more than one tar of the shards folder (e.g. {example}); it holds "
            "overlapping downloads: keep one copy of each shard, then make the pool again in a new folder"
        )


# --------------------------------------------------------------------------- partitioned passes over uids

LISTING = pa.schema([("uid", pa.string()), ("pos", pa.int64()), ("side", pa.int8())])
EVIDENCE = pa.schema(
    [("uid", pa.string()), ("pos", pa.int64()), ("side", pa.int8()), ("status", pa.string()), ("message", pa.string())]
)
STATUS_ROWS = pa.schema([("pos", pa.int64()), ("uid", pa.string()), ("status", pa.string()), ("message", pa.string())])
METADATA, POOL_ROW, REPORTED, SKIPPED = 0, 1, 2, 3  # sides of a uid's evidence
ROW_BYTES = 96  # a shuffled row: a 32-hex uid, its position and side, a short status


def _metadata_uids(path: str) -> pa.ChunkedArray:
    fs, local = open_fs(path)
    return read_parquet(fs, local, ["uid"]).column("uid")


def _listed_uids(shards_root: str, rel: str) -> list[str]:
    """The uids a tar may hold: its img2dataset parquet's (every sample it tried), or its samples' when it has none."""
    fs, _ = open_fs(shards_root)
    listing = f"{shards_root}/{rel.rsplit('.tar', 1)[0]}.parquet"
    if fs.exists(listing) and "uid" in parquet_file(fs, listing).schema_arrow.names:
        return [u for u in read_parquet(fs, listing, ["uid"]).column("uid").to_pylist() if u is not None]
    rows, skipped = scan_img2dataset_tar(fs, f"{shards_root}/{rel}", rel)
    return [row["uid"] for row in rows] + [s["uid"] for s in skipped if "uid" in s]


def _keyed(table: pa.Table, partitions: int) -> tuple[pa.Table, np.ndarray]:
    table = table.filter(table.column("uid").is_valid())
    return table, (hash_keys(table.column("uid")) % np.uint64(partitions)).astype(np.int64)


@dataclass(frozen=True)
class _UidListing:
    """Map task of the uid index: metadata file `source` (its uids), or tar `source - files` (its listed uids)."""

    meta: _Metadata
    shards_root: str
    tars: tuple[str, ...]
    partitions: int

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        files = len(self.meta.files)
        if source < files:
            uids, side = _metadata_uids(self.meta.files[source]), METADATA
        else:
            uids, side = pa.chunked_array([_listed_uids(self.shards_root, self.tars[source - files])], pa.string()), 1
        rows = np.arange(len(uids))
        table = pa.table([uids, position(source, rows), np.full(len(rows), side, np.int8)], schema=LISTING)
        return _keyed(table, self.partitions)


@dataclass(frozen=True)
class _JoinUids:
    """Reduce task of the uid index: each listed uid of a tar with the position of its first metadata row."""

    files: int

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        side = table.column("side").to_numpy()
        meta, listed = table.filter(pa.array(side == METADATA)), table.filter(pa.array(side != METADATA))
        meta = meta.filter(pa.array(first_occurrence(meta.select(["uid"]), meta.column("pos").to_numpy())))
        found = pc.index_in(listed.column("uid"), value_set=meta.column("uid")).fill_null(-1).to_numpy()
        hit = found >= 0
        result = pa.table(
            {"uid": listed.column("uid").filter(pa.array(hit)), "meta": meta.column("pos").take(pa.array(found[hit]))}
        )
        return result, (listed.column("pos").to_numpy()[hit] >> np.int64(32)) - self.files


@dataclass(frozen=True)
class _Evidence:
    """Map task of the status pass: a metadata file's uids, a pool shard's uids and unusable samples, or a tar's
    img2dataset records (sources in that order)."""

    out: str
    meta: _Metadata
    shard_ids: tuple[str, ...]
    shards_root: str
    tars: tuple[str, ...]
    partitions: int

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        files, shards = len(self.meta.files), len(self.shard_ids)
        if source < files:
            uids = _metadata_uids(self.meta.files[source]).to_pylist()
            rows = [(u, METADATA, None, None) for u in uids]
        elif source < files + shards:
            pool, shard = Pool(self.out), self.shard_ids[source - files]
            rows = [(u, POOL_ROW, None, None) for u in pool.metadata(shard, ["uid"]).column("uid").to_pylist()]
            skipped = pool.shard_stats(shard).get("skipped", [])
            rows += [(s["uid"], SKIPPED, s["reason"], s.get("detail")) for s in skipped if "uid" in s]
        else:
            rows = [(r["uid"], REPORTED, r["status"], r["error_message"]) for r in self._reported(source)]
        table = pa.table(
            [
                pa.array([r[0] for r in rows], pa.string()),
                position(source, np.arange(len(rows))),
                np.array([r[1] for r in rows], np.int8),
                pa.array([r[2] for r in rows], pa.string()),
                pa.array([r[3] for r in rows], pa.string()),
            ],
            schema=EVIDENCE,
        )
        return _keyed(table, self.partitions)

    def _reported(self, source: int) -> list[dict[str, Any]]:
        """The tar's img2dataset per-sample records (uid, status, error_message), where it has them."""
        fs, _ = open_fs(self.shards_root)
        rel = self.tars[source - len(self.meta.files) - len(self.shard_ids)]
        path = f"{self.shards_root}/{rel.rsplit('.tar', 1)[0]}.parquet"
        if fs.exists(path) and {"uid", "status"} <= set(parquet_file(fs, path).schema_arrow.names):
            columns = [
                "uid",
                "status",
                *(["error_message"] if "error_message" in parquet_file(fs, path).schema_arrow.names else []),
            ]
            return [{"error_message": None, **r} for r in read_parquet(fs, path, columns).to_pylist()]
        return []


@dataclass(frozen=True)
class _Statuses:
    """Reduce task of the status pass: why each metadata row whose uid is not in the pool is not (sent to its file),
    and each uid the pool holds more than once (sent to destination `files`)."""

    files: int

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        side = table.column("side").to_numpy()
        pool_uids = table.column("uid").filter(pa.array(side == POOL_ROW))
        counts = pa.table({"uid": pool_uids}).group_by("uid").aggregate([("uid", "count")])
        repeated = counts.column("uid").filter(pc.greater(counts.column("uid_count"), 1)).to_pylist()
        reported, skips = self._last(table, side == REPORTED), self._last(table, side == SKIPPED)
        meta = table.filter(
            pa.array((side == METADATA) & ~pc.is_in(table.column("uid"), pool_uids).to_numpy(zero_copy_only=False))
        )
        rows = []
        for uid, pos in zip(meta.column("uid").to_pylist(), meta.column("pos").to_pylist()):
            skip = skips.get(uid)
            status = sample_status(False, reported.get(uid), skip and {"reason": skip[0], "detail": skip[1]}, MISSING)
            rows.append((pos, uid, *status))
        rows += [(-1, uid, None, None) for uid in repeated]
        result = pa.table(
            [pa.array([r[i] for r in rows], field.type) for i, field in enumerate(STATUS_ROWS)], schema=STATUS_ROWS
        )
        destination = np.array([r[0] >> 32 if r[0] >= 0 else self.files for r in rows], np.int64)
        return result, destination

    @staticmethod
    def _last(table: pa.Table, chosen: np.ndarray) -> dict[str, tuple[str | None, str | None]]:
        """{uid: (status, message)} of the chosen rows, the last one (by position) of each uid winning."""
        rows = table.filter(pa.array(chosen))
        order = np.argsort(rows.column("pos").to_numpy(), kind="stable")
        uids, status, message = (
            rows.column(c).take(pa.array(order)).to_pylist() for c in ("uid", "status", "message")
        )
        return {u: (s, m) for u, s, m in zip(uids, status, message)}


@dataclass(frozen=True)
class _FileStatus:
    """Last task per metadata file: its absent rows to POOL/absent/, every row's status to the work folder."""

    out: str
    meta: _Metadata
    status: Shuffle
    work: str

    def __call__(self, number: int) -> int:
        found = self.status.read(number)
        rows = source_rows(found.column("pos").to_numpy())
        order = np.argsort(rows)
        fs, root = open_fs(self.out)
        fs.makedirs(f"{root}/{ABSENT_DIR}", exist_ok=True)
        absent = _metadata_table(self.meta.files[number]).take(pa.array(rows[order]))
        write_atomic(fs, f"{root}/{ABSENT_DIR}/{number:08d}.parquet", lambda handle: write_parquet(absent, handle))
        meta_fs, meta_path = open_fs(self.meta.files[number])
        table = read_parquet(meta_fs, meta_path, ["uid", "url"])
        statuses: list[tuple[str, str | None]] = [("ok", None)] * table.num_rows
        for row, status, message in zip(rows, found.column("status").to_pylist(), found.column("message").to_pylist()):
            statuses[int(row)] = (status, message)
        part = status_table(table.column("uid").to_pylist(), table.column("url").to_pylist(), statuses)
        work_fs, work = open_fs(self.work)
        work_fs.makedirs(work, exist_ok=True)
        write_atomic(work_fs, f"{work}/{number:05d}.parquet", lambda handle: write_parquet(part, handle))
        return len(rows)


def datacomp_summary_rows(result: DatacompResult, examples: int = 5) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: what was adopted, what their metadata lists that the tars lack, the embeddings."""
    rows: list[tuple[str, object]] = [
        ("pool", result.out),
        ("metadata", result.metadata),
        ("shards", result.shards),
        ("pool shards", result.info["num_shards"]),
        ("samples", result.info["num_samples"]),
    ]
    rows += status_summary_rows(result.summary, examples)
    if result.not_in_metadata:
        rows.append(("not in the metadata (kept)", result.not_in_metadata))
    if result.skipped:
        rows.append(("unusable samples (left out)", result.skipped))
    rows.append(("tars", ", ".join(f"{how} {count}" for how, count in sorted(result.placed.items()))))
    if result.placed.get("symlink"):
        rows.append(("note", f"symlinked tars point into {result.shards}: keep it in place"))
    if result.placed.get("copy"):
        rows.append(("note", "tars were copied: the pool is not on the local disk, so they could not be linked"))
    rows.append(("embeddings", ", ".join(result.models) or "none (no .npz features beside the metadata)"))
    return rows
