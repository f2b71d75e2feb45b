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
"""

from __future__ import annotations

import bisect
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
    place_img2dataset_shard,
    placed_tars,
    read_download_status,
    sample_status,
    scan_img2dataset_tar,
    status_summary_rows,
    status_table,
    summarize_status,
    write_status,
)
from clipsift.pipeline.importer import is_tar_name, list_files
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
MISSING = ("missing", "not in the shards: not downloaded, or a dead link")


# --------------------------------------------------------------------------- their metadata and features


@dataclass(frozen=True)
class _Metadata:
    """DataComp's metadata parquets, the .npz beside each, and every uid in file order."""

    files: tuple[str, ...]
    features: tuple[str | None, ...]
    offsets: tuple[int, ...]  # position of each file's first row among all rows, then the total
    uids: pa.Array
    dims: dict[str, int]  # feature prefix (l14, b32) -> dimension
    carried_types: dict[str, pa.DataType]  # their columns carried into the pool's metadata

    def locate(self, position: int) -> tuple[int, int]:
        file = bisect.bisect_right(self.offsets, position) - 1
        return file, position - self.offsets[file]

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
    for i, position in enumerate(positions):
        if position is not None:
            file, row = meta.locate(position)
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
    uids, offsets, features = [], [0], []
    for path in files:
        column = read_parquet(fs, path, ["uid"]).column("uid")
        uids += column.chunks
        offsets.append(offsets[-1] + len(column))
        npz = path[: -len(".parquet")] + ".npz"
        features.append(_check_npz(_url(fs, npz), len(column)) if fs.exists(npz) else None)
    dims = _feature_dims([f for f in features if f])
    carried = {name: schema.field(name).type for name in schema.names if name not in METADATA_BASE}
    return _Metadata(
        tuple(_url(fs, f) for f in files),
        tuple(features),
        tuple(offsets),
        pa.chunked_array(uids, pa.string()).combine_chunks(),
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

    def __call__(self, index: int) -> None:
        fs, _ = open_fs(self.shards_root)
        rel = self.tars[index]
        tar = f"{self.shards_root}/{rel}"
        rows, skipped = scan_img2dataset_tar(fs, tar, rel)
        uids = [row["uid"] for row in rows]
        positions = pc.index_in(pa.array(uids, pa.string()), value_set=self.meta.uids).to_pylist()
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
    todo = [i for i in range(len(tars)) if not shard_is_complete(out, i)]
    map_shards(_DatacompShard(out, shards_url, tars, meta), todo, desc="adopt DataComp shards", workers=workers)
    _check_unique_uids(out)
    _write_manifests(out, meta)
    _write_status(out, meta, shards_fs, shards_root, tars)
    summary = summarize_status(read_download_status(out))
    models = [FEATURE_MODELS[p] for p in meta.dims]
    info = finalize_pool(
        out,
        name or os.path.basename(shards_root.rstrip("/")),
        sources,
        datacomp={**summary.as_dict(), "embeddings": models},
    )
    pool = Pool(out)
    stats = [pool.shard_stats(shard) for shard in pool.shard_ids()]
    return DatacompResult(
        out,
        sources[0]["metadata"],
        sources[0]["shards"],
        info,
        summary,
        placed_tars(out),
        sum(s.get("not_in_metadata", 0) for s in stats),
        sum(len(s.get("skipped", [])) for s in stats),
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


def _check_unique_uids(out: str) -> None:
    table = pa.table({"uid": Pool(out).uids()})
    counts = table.group_by("uid").aggregate([("uid", "count")])
    repeated = counts.filter(pc.greater(counts["uid_count"], 1)).column("uid").to_pylist()
    if repeated:
        raise ClipsiftError(
            f"{len(repeated)} uids are in more than one tar of the shards folder (e.g. {repeated[0]}); it holds "
            "overlapping downloads: keep one copy of each shard, then make the pool again in a new folder"
        )


def _write_status(out: str, meta: _Metadata, shards_fs: Any, shards_root: str, tars: tuple[str, ...]) -> None:
    """POOL/download_status/datacomp.parquet: every metadata row, ok or why it is not in the pool."""
    pool = Pool(out)
    in_pool = pc.is_in(meta.uids, value_set=pool.uids().combine_chunks()).to_pylist()
    _write_absent(out, meta, np.array(in_pool, bool))
    urls = [u for f in meta.files for u in read_parquet(*open_fs(f), ["url"]).column("url").to_pylist()]
    uids = meta.uids.to_pylist()
    statuses: list[tuple[str, str | None]] = [("ok", None)] * len(uids)
    absent = [i for i, ok in enumerate(in_pool) if not ok]
    if absent:
        reported = _reported(shards_fs, shards_root, tars)
        skips = {
            s["uid"]: s for shard in pool.shard_ids() for s in pool.shard_stats(shard).get("skipped", []) if "uid" in s
        }
        for i in absent:
            statuses[i] = sample_status(False, reported.get(uids[i]), skips.get(uids[i]), MISSING)
    write_status(out, "datacomp", status_table(uids, urls, statuses))


def _write_absent(out: str, meta: _Metadata, in_pool: np.ndarray) -> None:
    """POOL/absent/NNNNNNNN.parquet per metadata file: its rows (every column) whose sample the pool lacks."""
    fs, root = open_fs(out)
    fs.makedirs(f"{root}/{ABSENT_DIR}", exist_ok=True)
    for i, path in enumerate(meta.files):
        lacking = ~in_pool[meta.offsets[i] : meta.offsets[i + 1]]
        table = _metadata_table(path).filter(pa.array(lacking))
        write_atomic(fs, f"{root}/{ABSENT_DIR}/{i:08d}.parquet", lambda handle, t=table: write_parquet(t, handle))


def _reported(fs: Any, root: str, tars: tuple[str, ...]) -> dict[str, tuple[str | None, str | None]]:
    """{uid: (status, error_message)} from img2dataset's per-shard parquets beside the tars, where present."""
    reported = {}
    for rel in tars:
        path = f"{root}/{rel.rsplit('.tar', 1)[0]}.parquet"
        if fs.exists(path) and {"uid", "status"} <= set(parquet_file(fs, path).schema_arrow.names):
            for row in read_parquet(fs, path, ["uid", "status", "error_message"]).to_pylist():
                reported[row["uid"]] = (row["status"], row["error_message"])
    return reported


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
