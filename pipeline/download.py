"""Download a pool with img2dataset: the function behind `clipsift pool download URLS --out POOL`.

URLS is a Parquet/CSV/TSV/JSONL table with url and caption columns (optionally uid, sha256,
face_bboxes, original sizes and any other columns), or a folder of such parquets (DataComp's
metadata). The stages, each resumable:

1. plan: the tables are read, checked and normalised into POOL/download/input/NNNNN.parquet
   (url, caption, uid, [face_bboxes], [sha256], carried columns), one per input file. Rows without
   a url or caption, and repeated uids (the first is kept), are not downloaded and get their status
   in POOL/download_status/rejected.parquet. One task per input file, so no process holds more than
   one file: repeated uids are found by a hash-partitioned pass over all files (pipeline/partition.py)
   in POOL/download/planning/. POOL/download/plan.json is written last.
2. download: img2dataset with DataComp's settings (`img2dataset_settings`) writes its webdataset
   shards to POOL/download/img2dataset/; its incremental mode skips the shards it finished before
   (a shard is finished when its NNNNN_stats.json exists).
3. adopt: each finished img2dataset shard becomes pool shard NNNNNNNN. Its tar is hard-linked into
   the pool unchanged (images are never re-encoded) and a metadata parquet is written in the tar's
   order; img2dataset's per-shard stats go into the shard stats, its per-sample parquet and stats
   json stay in the staging folder. POOL/download_status/NNNNNNNN.parquet gives every input row of
   the shard a status: ok, http_<code>, timeout, decode_error, sha256_mismatch or other (with
   img2dataset's message).

pool.json is written when every shard is in the pool, with the status summary under "download".
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import signal
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault(
    "NO_ALBUMENTATIONS_UPDATE", "1"
)  # img2dataset imports albumentations, which phones home without it

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pydantic import Field, PositiveInt  # noqa: E402

from clipsift import ClipsiftError  # noqa: E402
from clipsift.files import (  # noqa: E402
    is_local_fs,
    open_fs,
    parquet_file,
    read_parquet,
    write_atomic,
    write_json_atomic,
)
from clipsift.pipeline.importer import (  # noqa: E402
    CAPTION_COLUMNS,
    RESERVED_COLUMNS,
    TABLE_FORMATS,
    URL_COLUMNS,
    Skip,
    default_name,
    entry_json,
    file_ext,
    pick_column,
    read_rows,
    read_table,
    tar_record,
    text_or_none,
)
from clipsift.pipeline.partition import (  # noqa: E402
    Shuffle,
    hash_keys,
    later_occurrences,
    map_group,
    partitions_for,
    position,
    source_rows,
)
from clipsift.pipeline.pool import (  # noqa: E402
    BASE_SCHEMA,
    DEFAULT_SHARD_SIZE,
    Pool,
    Sample,
    ShardWriter,
    TarEntry,
    adopt_shard,
    derive_uid,
    finalize_pool,
    image_member,
    is_valid_uid,
    iter_tar,
    record_build_params,
    shard_id,
    shard_is_complete,
)
from clipsift.settings import Section  # noqa: E402

STAGING = "download"  # POOL/download/: the normalised url tables and img2dataset's own output
PLANNING = "planning"  # POOL/download/planning/: the plan's work (normalised tables, the uid shuffle) until plan.json
PLAN_ROW_BYTES = 64  # a row of the uid shuffle: the 32-hex uid and its position
STATUS_DIR = "download_status"
STATUS_SCHEMA = pa.schema(
    [("uid", pa.string()), ("url", pa.string()), ("status", pa.string()), ("message", pa.string())]
)
BBOX_COLUMN = "face_bboxes"
BBOX_TYPE = pa.list_(pa.list_(pa.float64()))
# img2dataset keeps these names for itself: carried columns so named get a `source_` prefix
IMG2DATASET_RESERVED = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)
OOM_SHARD_COUNT = 5  # img2dataset names shard i f"{i:05d}"
HTTP_ERROR = re.compile(r"http error (\d{3})")
NUM_EXAMPLES = 10


# --------------------------------------------------------------------------- status


def classify(status: str | None, message: str | None) -> str:
    """img2dataset's per-sample status and error message as one kind: ok, http_<code>, timeout, ..."""
    if status == "success":
        return "ok"
    text = (message or "").lower()
    if match := HTTP_ERROR.search(text):
        return f"http_{match.group(1)}"
    if "hash mismatch" in text:
        return "sha256_mismatch"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if status == "failed_to_resize":  # cv2 could not decode (or process) the bytes
        return "decode_error"
    return "other"


def sample_status(
    in_pool: bool, reported: tuple[str | None, str | None] | None, skip: dict[str, str] | None, absent: tuple[str, str]
) -> tuple[str, str | None]:
    """(status, message) of one input row: ok when in the pool, else why not: unusable in the tar, img2dataset's
    report, or `absent` when there is neither."""
    if in_pool:
        return "ok", None
    if skip is not None:
        return "other", f"unusable sample in img2dataset's tar: {skip['reason']}" + (
            f" ({skip['detail']})" if skip.get("detail") else ""
        )
    if reported is None:
        return absent
    kind = classify(*reported)
    if kind == "ok":
        return "other", "img2dataset reported success but the sample is not in its tar"
    return kind, reported[1]


def status_table(uids: list[str | None], urls: list[str | None], statuses: list[tuple[str, str | None]]) -> pa.Table:
    return pa.table(
        [
            pa.array(uids, pa.string()),
            pa.array(urls, pa.string()),
            pa.array([s for s, _ in statuses], pa.string()),
            pa.array([m for _, m in statuses], pa.string()),
        ],
        schema=STATUS_SCHEMA,
    )


def write_status(pool_url: str, name: str, table: pa.Table) -> None:
    fs, root = open_fs(pool_url)
    fs.makedirs(f"{root}/{STATUS_DIR}", exist_ok=True)
    write_atomic(fs, f"{root}/{STATUS_DIR}/{name}.parquet", lambda handle: pq.write_table(table, handle))


def read_download_status(pool_url: str) -> pa.Table:
    """Every status row of a downloaded (or DataComp) pool: uid, url, status, message."""
    fs, root = open_fs(pool_url)
    paths = sorted(fs.glob(f"{root}/{STATUS_DIR}/*.parquet"))
    tables = [read_parquet(fs, path).cast(STATUS_SCHEMA) for path in paths]
    return pa.concat_tables(tables) if tables else STATUS_SCHEMA.empty_table()


@dataclass
class StatusSummary:
    """Counts of a status table: how many inputs, how many made it, and why the others did not."""

    total: int
    ok: int
    by_kind: dict[str, int]  # failure kind -> count, most frequent first
    examples: list[dict[str, Any]]  # the first few failures: uid, url, status, message

    @property
    def success_rate(self) -> float:
        return self.ok / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "success_rate": round(self.success_rate, 6),
            "by_kind": self.by_kind,
        }


def summarize_status(table: pa.Table) -> StatusSummary:
    counts = Counter(table.column("status").to_pylist())
    ok = counts.pop("ok", 0)
    failed = table.filter(pc.not_equal(table["status"], "ok"))
    return StatusSummary(table.num_rows, ok, dict(counts.most_common()), failed.slice(0, NUM_EXAMPLES).to_pylist())


def summarize_pool_status(pool_url: str) -> StatusSummary:
    """`summarize_status` of every status row of a pool, read in batches: one row per input, billions of them."""
    fs, root = open_fs(pool_url)
    counts: Counter[str] = Counter()
    total, examples = 0, []
    for path in sorted(fs.glob(f"{root}/{STATUS_DIR}/*.parquet")):
        for batch in parquet_file(fs, path).iter_batches(batch_size=1 << 16):
            table = pa.Table.from_batches([batch]).cast(STATUS_SCHEMA)
            total += table.num_rows
            found = pc.value_counts(table.column("status")).to_pylist()  # in order of first appearance
            counts.update({entry["values"]: entry["counts"] for entry in found})
            if len(examples) < NUM_EXAMPLES:
                failed = table.filter(pc.not_equal(table["status"], "ok"))
                examples += failed.slice(0, NUM_EXAMPLES - len(examples)).to_pylist()
    ok = counts.pop("ok", 0)
    return StatusSummary(total, ok, dict(counts.most_common()), examples)


def status_summary_rows(summary: StatusSummary, examples: int = 5) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("listed", summary.total),
        ("in the pool", summary.ok),
        ("success rate", f"{summary.success_rate:.1%}"),
    ]
    rows += [(f"  {kind}", count) for kind, count in summary.by_kind.items()]
    for example in summary.examples[:examples]:
        message = f": {example['message']}" if example.get("message") else ""
        rows.append(("  e.g.", f"{example['url'] or example['uid'] or 'a row'} {example['status']}{message}"))
    return rows


# --------------------------------------------------------------------------- img2dataset tars -> pool shards


def _adopted_row(source: str, entry: TarEntry) -> dict[str, Any]:
    """The metadata row of one sample of a tar that is adopted unchanged (raises Skip when it cannot be)."""
    record = tar_record(source, entry, keep_caption=True)
    image = image_member(entry)
    if image is None:
        raise Skip(
            "no image member", f"members: {', '.join(sorted(entry.members))}; a pool image is .jpg, .png or .webp"
        )
    width, height = record.size or (None, None)
    return {
        "uid": record.uid,
        "key": entry.key,
        "text": record.caption,
        "url": record.url,
        "original_width": width,
        "original_height": height,
        "sha256": hashlib.sha256(image[1]).hexdigest(),
        **record.extra,
    }


def scan_img2dataset_tar(fs: Any, path: str, name: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Metadata rows of an img2dataset tar in its order, and the samples that cannot be adopted (with reasons)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    with fs.open(path, "rb") as handle:
        for entry in iter_tar(handle, source=path):
            source = f"{name}/{entry.key}"
            try:
                row = _adopted_row(source, entry)
                if row["uid"] in seen:
                    raise Skip("duplicate uid", row["uid"])
            except Skip as skip:
                uid = entry_json(entry).get("uid")
                skipped.append({**skip.entry(source), **({"uid": uid} if is_valid_uid(uid) else {})})
                continue
            seen.add(row["uid"])
            rows.append(row)
    return rows, skipped


def place_img2dataset_shard(
    pool_url: str,
    index: int,
    tar_url: str,
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    stats: dict[str, Any],
    extra_types: dict[str, pa.DataType],
) -> str:
    """Pool shard `index` from an img2dataset tar: adopted unchanged when every sample is usable, else
    rewritten without the unusable ones (same keys and image bytes). Returns hardlink|symlink|copy|rewritten."""
    stats = {**stats, "skipped": skipped}
    if not skipped:
        return adopt_shard(pool_url, index, tar_url, rows, stats, extra_types=extra_types)
    by_key = {row["key"]: row for row in rows}
    fs, path = open_fs(tar_url)
    with ShardWriter(pool_url, index) as writer, fs.open(path, "rb") as handle:
        for entry in iter_tar(handle, source=tar_url):
            if entry.key in by_key:
                writer.write(_sample(entry, by_key[entry.key]))
        writer.stats.update(stats, tar="rewritten")
    return "rewritten"


def placed_tars(pool_url: str) -> dict[str, int]:
    """How each shard's tar got into the pool (hardlink, symlink, copy, rewritten), from the shard stats."""
    pool = Pool(pool_url)
    return dict(Counter(pool.shard_stats(shard).get("tar", "written") for shard in pool.shard_ids()))


def _sample(entry: TarEntry, row: dict[str, Any]) -> Sample:
    ext, image = image_member(entry)
    return Sample(
        row["uid"],
        image,
        ext,
        row["text"],
        row["url"],
        row["original_width"],
        row["original_height"],
        row["sha256"],
        {k: v for k, v in row.items() if k not in BASE_SCHEMA.names},
        key=entry.key,
    )


def staging_name(shard: int) -> str:
    return f"{shard:0{OOM_SHARD_COUNT}d}"


# --------------------------------------------------------------------------- plan: the normalised url tables


@dataclass(frozen=True)
class InputPart:
    """One normalised url table (from one input file): img2dataset shards [first_shard, first_shard + num_shards)."""

    name: str
    source: str
    num_rows: int
    first_shard: int
    num_shards: int


@dataclass(frozen=True)
class DownloadPlan:
    parts: tuple[InputPart, ...]
    shard_size: int
    carried: tuple[str, ...]  # columns saved with each sample (img2dataset's save_additional_columns, besides uid)
    bbox: bool  # a face_bboxes column is present
    sha256: bool  # a listed sha256 column is kept (to verify)
    num_inputs: int
    num_rejected: int
    dropped_columns: tuple[str, ...]  # columns of a type img2dataset cannot save in its json

    @property
    def num_shards(self) -> int:
        return sum(part.num_shards for part in self.parts)

    def locate(self, shard: int) -> tuple[InputPart, int]:
        """The input part of img2dataset shard `shard` and its row group there."""
        for part in self.parts:
            if part.first_shard <= shard < part.first_shard + part.num_shards:
                return part, shard - part.first_shard
        raise IndexError(shard)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DownloadPlan:
        parts = tuple(InputPart(**part) for part in data.pop("parts"))
        return cls(parts=parts, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _url_files(urls: str) -> list[tuple[Any, str, str]]:
    """(fs, path, format) of each input table: the file itself, or every .parquet of a folder, sorted."""
    fs, path = open_fs(os.path.abspath(urls) if "://" not in urls else urls)
    if not fs.exists(path):
        raise ClipsiftError(
            f"{urls}: no such file or folder; pass a table of urls and captions or a folder of DataComp metadata "
            "parquets"
        )
    if fs.isdir(path):
        files = sorted(p for p in fs.glob(f"{path}/*.parquet"))
        if not files:
            raise ClipsiftError(
                f"{urls}: no .parquet files in this folder; pass a table of urls and captions "
                "(.parquet/.csv/.jsonl) or a folder of DataComp metadata parquets"
            )
        return [(fs, file, "parquet") for file in files]
    fmt = TABLE_FORMATS.get(file_ext(path))
    if fmt is None:
        raise ClipsiftError(
            f"{urls}: not a {'/'.join('.' + e for e in TABLE_FORMATS)} table; pass a table of urls and captions"
        )
    return [(fs, path, fmt)]


def _jsonable(dtype: pa.DataType) -> bool:
    """Values img2dataset can put in each sample's json: strings, numbers, booleans and lists of them."""
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return _jsonable(dtype.value_type)
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_null(dtype)
    )


def _bboxes(path: str, column: pa.ChunkedArray) -> pa.Array:
    """face_bboxes as list<list<double>>; CSV gives them as JSON text."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            values = [json.loads(v) if v and v.strip() else None for v in column.to_pylist()]
            return pa.array(values, BBOX_TYPE)
        except (ValueError, TypeError, pa.ArrowException) as err:
            raise ClipsiftError(f"{path}: column {BBOX_COLUMN!r} must hold lists of [x0, y0, x1, y1] ({err})") from err
    try:
        return column.combine_chunks().cast(BBOX_TYPE)
    except (pa.ArrowException, ValueError) as err:
        raise ClipsiftError(
            f"{path}: column {BBOX_COLUMN!r} has type {column.type}; it must hold lists of [x0, y0, x1, y1] ({err})"
        ) from err


@dataclass
class _Normalised:
    source: str
    table: pa.Table  # url, caption, uid, [face_bboxes], [sha256], carried...
    keep: list[bool]
    reasons: list[tuple[str, str] | None]  # (status, message) of rows that are not downloaded
    dropped: list[str]


def _columns(
    path: str, names: list[str], url_column: str | None, caption_column: str | None, verify_sha256: bool
) -> tuple[str, str]:
    """The url and caption columns of a table with these columns; raises ClipsiftError naming the file."""
    listed = ", ".join(names)
    url = pick_column(names, url_column, "url", URL_COLUMNS, path)
    if url is None:
        raise ClipsiftError(
            f"{path}: no url column (looked for {', '.join(URL_COLUMNS)}); the table's columns are: {listed}. "
            "Name it with --url-column"
        )
    caption = pick_column(names, caption_column, "caption", CAPTION_COLUMNS, path)
    if caption is None:
        raise ClipsiftError(
            f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); the table's columns are: "
            f"{listed}. Name it with --caption-column"
        )
    if verify_sha256 and "sha256" not in names:
        raise ClipsiftError(
            f"{path}: --verify-sha256 needs a sha256 column (the sha256 of each image's bytes); the table's "
            f"columns are: {listed}"
        )
    return url, caption


def _normalise(
    fs: Any, path: str, fmt: str, url_column: str | None, caption_column: str | None, verify_sha256: bool
) -> _Normalised:
    table = read_table(fs, path, fmt)
    names = table.column_names
    url, caption = _columns(path, names, url_column, caption_column, verify_sha256)
    base = os.path.basename(path)
    urls = [text_or_none(v) for v in table[url].to_pylist()]
    captions = [None if v is None else str(v) for v in table[caption].to_pylist()]
    given = table["uid"].to_pylist() if "uid" in names else [None] * table.num_rows
    uids = [own if is_valid_uid(own) else derive_uid(u) if u else None for own, u in zip(given, urls)]
    reasons: list[tuple[str, str] | None] = []
    for number, (u, text) in enumerate(zip(urls, captions)):
        if u is None:
            reasons.append(("missing_url", f"{base} row {number}: no url"))
        elif text is None or not text.strip():
            reasons.append(("missing_caption", f"{base} row {number}: empty caption"))
        else:
            reasons.append(None)
    columns = {
        "url": pa.array(urls, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "uid": pa.array(uids, pa.string()),
    }
    if BBOX_COLUMN in names:
        columns[BBOX_COLUMN] = _bboxes(path, table[BBOX_COLUMN])
    if verify_sha256:
        columns["sha256"] = table["sha256"].cast(pa.string())
    dropped = []
    for name in names:
        if name in (url, caption, "uid", BBOX_COLUMN, "sha256"):
            continue
        if not _jsonable(table.schema.field(name).type):
            dropped.append(name)
            continue
        carried = f"source_{name}" if name in RESERVED_COLUMNS | IMG2DATASET_RESERVED else name
        columns[carried] = table[name]
    return _Normalised(path, pa.table(columns), [r is None for r in reasons], reasons, dropped)


def _mark_duplicates(parts: list[_Normalised]) -> None:
    """Rows whose uid an earlier kept row has (across all files, in order) are not downloaded."""
    keys, positions = [], []
    for number, part in enumerate(parts):
        keep = np.array(part.keep, bool)
        keys.append(part.table["uid"].filter(pa.array(keep)))
        positions.append(position(number, np.flatnonzero(keep)))
    table = pa.table({"uid": pa.chunked_array(keys, pa.string()), "pos": np.concatenate(positions)})
    for pos in later_occurrences(0, table)[0].column("pos").to_numpy():
        _mark_repeated(parts[int(pos >> 32)], int(source_rows(pos)))


def _mark_repeated(part: _Normalised, row: int) -> None:
    uid = part.table["uid"][row].as_py()
    part.keep[row] = False
    part.reasons[row] = (
        "duplicate_uid",
        f"{os.path.basename(part.source)} row {row}: uid {uid} is listed earlier (the first is downloaded)",
    )


def _keep_common_columns(parts: list[_Normalised]) -> None:
    """img2dataset saves the same columns from every file: columns some files lack are dropped from all."""
    common = set.intersection(*[set(part.table.column_names) for part in parts])
    for part in parts:
        extra = [c for c in part.table.column_names if c not in common]
        part.dropped += extra
        part.table = part.table.drop_columns(extra)


def prepare_inputs(
    urls: str, *, verify_sha256: bool, url_column: str | None = None, caption_column: str | None = None
) -> list[_Normalised]:
    """Every input table read, checked and normalised in this process, repeated uids marked: what the plan writes,
    for a look from a notebook (`plan_download` holds one table at a time and finds repeated uids by a
    partitioned pass)."""
    parts = [
        _normalise(fs, path, fmt, url_column, caption_column, verify_sha256) for fs, path, fmt in _url_files(urls)
    ]
    _keep_common_columns(parts)
    _mark_duplicates(parts)
    return parts


def _check_inputs(
    files: list[tuple[Any, str, str]], url_column: str | None, caption_column: str | None, verify_sha256: bool
) -> list[int]:
    """Every input table's columns checked from its schema before anything is written; their row counts."""
    counts = []
    for fs, path, fmt in files:
        if fmt == "parquet":
            try:
                file = parquet_file(fs, path)
                names, rows = file.schema_arrow.names, file.metadata.num_rows
            except (pa.ArrowException, OSError, ValueError):
                table = read_table(fs, path, fmt)  # raises the error that names the file
                names, rows = table.column_names, table.num_rows
        else:
            table = read_table(fs, path, fmt)
            names, rows = table.column_names, table.num_rows
        _columns(path, names, url_column, caption_column, verify_sha256)
        counts.append(rows)
    return counts


@dataclass(frozen=True)
class _NormaliseFile:
    """Map task of the plan: input file `number` normalised into the planning folder; its downloadable rows' uids
    go to the uid shuffle (a picklable callable for Ray tasks)."""

    files: tuple[tuple[Any, str, str], ...]
    work: str
    url_column: str | None
    caption_column: str | None
    verify_sha256: bool
    partitions: int

    def __call__(self, number: int) -> tuple[pa.Table, np.ndarray]:
        fs, path, fmt = self.files[number]
        part = _normalise(fs, path, fmt, self.url_column, self.caption_column, self.verify_sha256)
        staged = part.table.append_column("__status", pa.array([r and r[0] for r in part.reasons], pa.string()))
        staged = staged.append_column("__message", pa.array([r and r[1] for r in part.reasons], pa.string()))
        staged = staged.replace_schema_metadata({"dropped": json.dumps(part.dropped), "source": path})
        work_fs, work = open_fs(self.work)
        work_fs.makedirs(f"{work}/normalised", exist_ok=True)
        write_atomic(work_fs, f"{work}/normalised/{number:05d}.parquet", lambda h: pq.write_table(staged, h))
        keep = np.array(part.keep, bool)
        uids = part.table["uid"].filter(pa.array(keep))
        table = pa.table({"uid": uids, "pos": pa.array(position(number, np.flatnonzero(keep)), pa.int64())})
        return table, (hash_keys(uids) % np.uint64(self.partitions)).astype(np.int64)


@dataclass(frozen=True)
class _FinishFile:
    """Last task of the plan for input file `number`: its repeated uids marked from the shuffle, its downloadable
    rows (the columns every file has) and its rejected rows written to the planning folder."""

    work: str
    shuffle: Shuffle
    columns: tuple[str, ...]
    shard_size: int

    def __call__(self, number: int) -> tuple[int, int, list[str]]:
        fs, work = open_fs(self.work)
        staged = read_parquet(fs, f"{work}/normalised/{number:05d}.parquet")
        part = _Normalised(
            staged.schema.metadata[b"source"].decode(),
            staged.select(list(self.columns)),
            [s is None for s in staged["__status"].to_pylist()],
            [
                None if s is None else (s, m)
                for s, m in zip(staged["__status"].to_pylist(), staged["__message"].to_pylist())
            ],
            json.loads(staged.schema.metadata[b"dropped"]),
        )
        for row in source_rows(self.shuffle.read(number).column("pos").to_numpy()):
            _mark_repeated(part, int(row))
        kept = part.table.filter(pa.array(part.keep))
        for sub in ("input", "rejected"):
            fs.makedirs(f"{work}/{sub}", exist_ok=True)
        write_atomic(
            fs,
            f"{work}/input/{number:05d}.parquet",
            lambda h: pq.write_table(kept, h, row_group_size=min(self.shard_size, 65536)),
        )
        rejected = [
            (u, url, r)
            for u, url, r in zip(part.table["uid"].to_pylist(), part.table["url"].to_pylist(), part.reasons)
            if r
        ]
        table = status_table([u for u, _, _ in rejected], [u for _, u, _ in rejected], [r for _, _, r in rejected])
        write_atomic(fs, f"{work}/rejected/{number:05d}.parquet", lambda h: pq.write_table(table, h))
        extra = [c for c in staged.column_names if c not in self.columns and not c.startswith("__")]
        return kept.num_rows, len(rejected), part.dropped + extra


def _make_plan(
    urls: str,
    out: str,
    shard_size: int,
    verify_sha256: bool,
    url_column: str | None,
    caption_column: str | None,
    params: dict[str, Any],
    workers: int | None,
) -> DownloadPlan:
    """Stage 1's work, one input file per task: normalise each file (map), find the repeated uids by a partitioned
    pass over all files (reduce: first in file order is kept), write each file's input part and rejected rows."""
    from clipsift.pipeline.parallel import map_shards

    files = _url_files(urls)
    counts = _check_inputs(files, url_column, caption_column, verify_sha256)
    record_build_params(out, params)
    fs, root = open_fs(out)
    work = f"{root}/{STAGING}/{PLANNING}"
    work_url = _url_of(fs, work)
    rows = sum(counts)
    shuffle = Shuffle(
        f"{work_url}/uids",
        len(files),
        partitions_for(rows, PLAN_ROW_BYTES),
        len(files),
        map_group(len(files), max(counts, default=0), PLAN_ROW_BYTES),
    )
    normalise = _NormaliseFile(tuple(files), work_url, url_column, caption_column, verify_sha256, shuffle.partitions)
    shuffle.run(normalise, later_occurrences, desc="plan: repeated uids", workers=workers)
    schemas = [parquet_file(fs, f"{work}/normalised/{i:05d}.parquet").schema_arrow for i in range(len(files))]
    common = set.intersection(*[set(schema.names) for schema in schemas])
    columns = tuple(name for name in schemas[0].names if name in common and not name.startswith("__"))
    finished = map_shards(
        _FinishFile(work_url, shuffle, columns, shard_size),
        range(len(files)),
        desc="plan: input parts",
        workers=workers,
    )
    fs.makedirs(f"{root}/{STAGING}/input", exist_ok=True)
    parts, first_shard = [], 0
    for number, ((_, path, _), (kept, _, _)) in enumerate(zip(files, finished)):
        if kept:
            name = f"{len(parts):05d}.parquet"
            fs.mv(f"{work}/input/{number:05d}.parquet", f"{root}/{STAGING}/input/{name}")
            parts.append(InputPart(name, path, kept, first_shard, math.ceil(kept / shard_size)))
            first_shard += parts[-1].num_shards
    num_rejected = sum(rejected for _, rejected, _ in finished)
    if num_rejected:
        concat_status(out, "rejected", [f"{work}/rejected/{i:05d}.parquet" for i in range(len(files))])
    plan = DownloadPlan(
        parts=tuple(parts),
        shard_size=shard_size,
        carried=tuple(c for c in columns if c not in ("url", "caption", "uid", BBOX_COLUMN, "sha256")),
        bbox=BBOX_COLUMN in columns,
        sha256="sha256" in columns,
        num_inputs=sum(counts),
        num_rejected=num_rejected,
        dropped_columns=tuple(sorted({c for _, _, dropped in finished for c in dropped})),
    )
    write_json_atomic(fs, f"{root}/{STAGING}/plan.json", asdict(plan))
    fs.rm(work, recursive=True)
    return plan


def _url_of(fs: Any, path: str) -> str:
    """A path that open_fs maps back to (fs, path): plain for local files."""
    return path if is_local_fs(fs) else fs.unstrip_protocol(path)


def concat_status(pool_url: str, name: str, paths: list[str]) -> None:
    """One status file from several, read one at a time."""
    fs, root = open_fs(pool_url)
    fs.makedirs(f"{root}/{STATUS_DIR}", exist_ok=True)

    def write(handle: Any) -> None:
        with pq.ParquetWriter(handle, STATUS_SCHEMA) as writer:
            for path in paths:
                writer.write_table(read_parquet(fs, path).cast(STATUS_SCHEMA))

    write_atomic(fs, f"{root}/{STATUS_DIR}/{name}.parquet", write)


def plan_download(
    urls: str,
    out: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    verify_sha256: bool = False,
    url_column: str | None = None,
    caption_column: str | None = None,
    params: dict[str, Any] | None = None,
    workers: int | None = None,
) -> DownloadPlan:
    """Stage 1: check and normalise the url tables into POOL/download/input/, or load the plan a previous run
    made. The settings (with `params`, the other settings that shape the pool) go to build.json; a resumed
    run with other settings is refused."""
    src = os.path.abspath(urls) if "://" not in urls else urls
    params = {
        "kind": "download",
        "sources": [{"kind": "download", "src": src}],
        "shard_size": shard_size,
        "verify_sha256": verify_sha256,
        "url_column": url_column,
        "caption_column": caption_column,
        **(params or {}),
    }
    plan = load_plan(out)
    if plan is None:
        return _make_plan(urls, out, shard_size, verify_sha256, url_column, caption_column, params, workers)
    record_build_params(out, params)
    return plan


def load_plan(pool_url: str) -> DownloadPlan | None:
    fs, root = open_fs(pool_url)
    path = f"{root}/{STAGING}/plan.json"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return DownloadPlan.from_json(json.load(handle))


# --------------------------------------------------------------------------- img2dataset


def img2dataset_settings(
    *,
    image_size: int,
    shard_size: int,
    processes: int,
    threads: int,
    retries: int,
    timeout: int,
    blur_faces: bool,
    verify_sha256: bool,
    bbox: bool,
    carried: tuple[str, ...] = (),
) -> dict[str, Any]:
    """img2dataset.download keyword arguments with DataComp's settings, for a normalised url table."""
    return dict(
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        image_size=image_size,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        encode_format="jpg",
        encode_quality=95,
        number_sample_per_shard=shard_size,
        oom_shard_count=OOM_SHARD_COUNT,
        processes_count=processes,
        thread_count=threads,
        retries=retries,
        timeout=timeout,
        save_additional_columns=["uid", *carried, *([BBOX_COLUMN] if bbox and not blur_faces else [])],
        bbox_col=BBOX_COLUMN if bbox and blur_faces else None,
        compute_hash="sha256",
        verify_hash=["sha256", "sha256"] if verify_sha256 else None,
        incremental_mode="incremental",
        distributor="multiprocessing",
        enable_wandb=False,
    )


def run_img2dataset(url_list: str, output_folder: str, settings: dict[str, Any]) -> None:
    """img2dataset.download, imported lazily (it takes seconds: torch, albumentations); Ctrl-C stays an interrupt."""
    import img2dataset

    previous = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(url_list=url_list, output_folder=output_folder, **settings)
    except SystemExit:  # img2dataset's SIGINT handler exits with status 0
        raise KeyboardInterrupt("download interrupted; run the same command again to continue") from None
    finally:
        if previous is not None:  # None: the handler was not set from Python, so there is none to restore
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- adopting a downloaded shard


@dataclass(frozen=True)
class _AdoptShard:
    """Turns finished img2dataset shard `shard` into pool shard `shard` (a picklable callable for Ray tasks)."""

    pool_url: str
    plan: DownloadPlan

    def __call__(self, shard: int) -> str:
        fs, root = open_fs(self.pool_url)
        staging = f"{root}/{STAGING}/img2dataset/{staging_name(shard)}"
        part, index = self.plan.locate(shard)
        part_path = f"{root}/{STAGING}/input/{part.name}"
        start = index * self.plan.shard_size  # img2dataset cuts each input file into shards in order
        inputs = read_rows(fs, part_path, "parquet", start, min(start + self.plan.shard_size, part.num_rows))
        rows, skipped = scan_img2dataset_tar(fs, f"{staging}.tar", f"{staging_name(shard)}.tar")
        reported = read_parquet(fs, f"{staging}.parquet", ["uid", "status", "error_message"]).to_pylist()
        write_status(self.pool_url, shard_id(shard), _shard_status(inputs, rows, skipped, reported))
        with fs.open(f"{staging}_stats.json", "rb") as handle:
            stats = {"img2dataset": json.load(handle)}
        schema = parquet_file(fs, part_path).schema_arrow
        how = place_img2dataset_shard(
            self.pool_url, shard, f"{staging}.tar", rows, skipped, stats, _extra_types(schema)
        )
        fs.rm(f"{staging}.tar")  # the pool holds it now
        return how


def _extra_types(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Types of the carried columns in the pool's metadata, so that every shard has the same schema."""
    types = {name: schema.field(name).type for name in schema.names if name not in ("url", "caption", "uid", "sha256")}
    return {**types, "source_sha256": pa.string()}


def _shard_status(
    inputs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    reported: list[dict[str, Any]],
) -> pa.Table:
    in_pool = {row["uid"] for row in rows}
    by_uid = {r["uid"]: (r["status"], r["error_message"]) for r in reported}
    skips = {s["uid"]: s for s in skipped if "uid" in s}
    uids, urls = [r["uid"] for r in inputs], [r["url"] for r in inputs]
    absent = ("other", "img2dataset wrote no record for this sample")
    statuses = [sample_status(uid in in_pool, by_uid.get(uid), skips.get(uid), absent) for uid in uids]
    return status_table(uids, urls, statuses)


# --------------------------------------------------------------------------- the stage


@dataclass
class DownloadResult:
    """What a download made: pool.json's content, the status summary and how the shards were placed."""

    out: str
    src: str
    info: dict[str, Any]
    summary: StatusSummary
    num_rejected: int
    dropped_columns: list[str]
    placed: dict[str, int] = field(default_factory=dict)  # how the tars got into the pool -> shards


class DownloadSettings(Section):
    """How `clipsift pool download` (and a run's `pool: {kind: download}`) fetches and stores the images."""

    infra = frozenset({"processes", "threads"})
    processes: PositiveInt | None = None  # img2dataset processes (default: all cores)
    threads: PositiveInt = 64
    image_size: PositiveInt = 512
    shard_size: PositiveInt = DEFAULT_SHARD_SIZE
    retries: int = Field(2, ge=0)
    timeout: PositiveInt = 10
    blur_faces: bool = True
    verify_sha256: bool = False
    url_column: str | None = None
    caption_column: str | None = None
    name: str | None = None


def download_pool(
    urls: str, out: str, settings: DownloadSettings | None = None, *, workers: int | None = None
) -> DownloadResult:
    """Download the images of `urls` with img2dataset into the pool `out` (see the module docstring).

    Re-running the same command continues a killed download: finished img2dataset shards are not
    downloaded again and finished pool shards are kept. Must run in the main thread (img2dataset
    installs a SIGINT handler).
    """
    s = settings or DownloadSettings()
    src = os.path.abspath(urls) if "://" not in urls else urls
    params = {
        "image_size": s.image_size,
        "blur_faces": s.blur_faces,
        "resize_mode": "keep_ratio_largest",
        "resize_only_if_bigger": True,
        "encode_format": "jpg",
    }
    plan = plan_download(
        urls,
        out,
        shard_size=s.shard_size,
        verify_sha256=s.verify_sha256,
        url_column=s.url_column,
        caption_column=s.caption_column,
        params=params,
        workers=workers,
    )
    config = img2dataset_settings(
        image_size=s.image_size,
        shard_size=s.shard_size,
        processes=s.processes or os.cpu_count() or 1,
        threads=s.threads,
        retries=s.retries,
        timeout=s.timeout,
        blur_faces=s.blur_faces,
        verify_sha256=s.verify_sha256,
        bbox=plan.bbox,
        carried=plan.carried,
    )
    _download_and_adopt(out, plan, config, workers)
    summary = summarize_pool_status(out)
    sources = [{"kind": "download", "src": src, "num_inputs": plan.num_inputs}]
    info = finalize_pool(out, s.name or default_name(src), sources, download=summary.as_dict())
    return DownloadResult(out, src, info, summary, plan.num_rejected, list(plan.dropped_columns), placed_tars(out))


def _download_and_adopt(out: str, plan: DownloadPlan, settings: dict[str, Any], workers: int | None) -> None:
    from clipsift.pipeline.parallel import map_shards

    fs, root = open_fs(out)
    staging = f"{root}/{STAGING}/img2dataset"
    todo = [s for s in range(plan.num_shards) if not shard_is_complete(out, s)]
    pending = set(todo)  # set lookups: a DataComp-sized plan has up to a million shards
    finished = functools.partial(_is_finished, fs, staging)
    for shard in range(plan.num_shards):
        tar = f"{staging}/{staging_name(shard)}.tar"
        if shard not in pending and fs.exists(tar):  # adopted, then killed before its staging tar was removed
            fs.rm(tar)
        elif shard in pending and finished(shard) and not fs.exists(tar):  # its tar is gone: download it again
            fs.rm(f"{staging}/{staging_name(shard)}_stats.json")
    if not all(finished(s) for s in todo):
        run_img2dataset(f"{root}/{STAGING}/input", staging, settings)
    done = [s for s in todo if finished(s)]
    map_shards(_AdoptShard(out, plan), done, desc="adopt shards", workers=workers)
    adopted = set(done)
    unfinished = [s for s in todo if s not in adopted]
    if unfinished:
        listed = ", ".join(staging_name(s) for s in unfinished[:10]) + (" ..." if len(unfinished) > 10 else "")
        raise ClipsiftError(
            f"{len(unfinished)} of {plan.num_shards} img2dataset shards did not finish ({listed}; see its "
            f"messages above); run the same command again to retry them, finished shards are kept"
        )


def _is_finished(fs: Any, staging: str, shard: int) -> bool:
    """img2dataset writes a shard's stats json last: with it, the shard's tar and parquet are complete."""
    return fs.exists(f"{staging}/{staging_name(shard)}_stats.json")


def download_summary_rows(result: DownloadResult, examples: int = 5) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: where from, where to, how many made it and why the others did not."""
    rows: list[tuple[str, object]] = [
        ("pool", result.out),
        ("source", result.src),
        ("shards", result.info["num_shards"]),
        ("samples", result.info["num_samples"]),
    ]
    rows += status_summary_rows(result.summary, examples)
    if result.dropped_columns:
        rows.append(("columns not carried", ", ".join(result.dropped_columns)))
    if result.placed:
        rows.append(("tars adopted", ", ".join(f"{how} {count}" for how, count in sorted(result.placed.items()))))
    return rows
