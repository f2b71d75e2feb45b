"""Bring-your-own-data import: the function behind `clipsift pool import SRC --out POOL`.

Three kinds of source become a clipsift pool:

- folder: images anywhere under a folder, each with a same-stem .txt caption beside it
  (`a/b.jpg` + `a/b.txt`); hidden files and folders are ignored;
- table: one Parquet, CSV, TSV or JSONL file with an image column (paths, relative to the table's
  folder or absolute, or image bytes, including Hugging Face's {bytes, path} struct) and a caption
  column. A url column and a valid uid column are used; every other column is carried into the
  pool's metadata (names that clash with the pool's own columns get a `source_` prefix);
- webdataset: a .tar, or a folder of them, such as img2dataset output. The uid, url and original
  size in each sample's .json are kept, img2dataset's sha256 becomes `source_sha256`, and extra
  fields (img2dataset's `save_additional_columns`) are carried.

Uids: the source's own uid when it is 32 lowercase hex, else derive_uid(url) when there is a url,
else derive_uid of the relative path (folder, table), the tar/key name (webdataset) or the image's
sha256 (table bytes), then "\\n", then the caption. Captions are stripped of surrounding whitespace.

Every image is decoded to verify it. jpg/png/webp bytes are stored unchanged; other formats PIL
reads (bmp, gif, tiff...) are stored as PNG and counted as converted. Images with transparent
pixels (RGBA, LA, palette or RGB with a transparent colour) are composited onto white as img2dataset
does when it re-encodes (`clipsift.images.white_background`), stored as PNG and counted as
composited; the pool's build settings say so. Unusable samples (no or empty
caption, caption not UTF-8, undecodable image, duplicate uid...) are skipped, not fatal: each is
listed with its reason in its shard's stats (`Pool.shard_stats`), so a resumed run reports the
same totals.

Inputs are partitioned deterministically (sorted files or table rows in chunks of `shard_size`,
one shard per input tar) and scanned once before any shard is written, so the first occurrence of
a uid is kept and later ones are skipped whichever shards a resumed run still has to write.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
from PIL import Image

from clipsift import ClipsiftError
from clipsift.arrays import numpy_of, strings_of
from clipsift.files import content_sha256, open_fs, parquet_file, read_parquet
from clipsift.images import ImageDecodeError, open_image, to_rgb, white_background
from clipsift.pipeline.partition import (
    Shuffle,
    hash_keys,
    keyed_rows,
    later_occurrences,
    map_group,
    partitions_for,
    position,
    read_batch,
    source_rows,
    write_batches,
)
from clipsift.pipeline.pool import (
    BASE_SCHEMA,
    DEFAULT_SHARD_SIZE,
    Pool,
    Sample,
    ShardWriter,
    TarEntry,
    build_pool,
    derive_uid,
    image_member,
    is_valid_uid,
    iter_tar,
    record_build_params,
)

KINDS = ("folder", "table", "webdataset")
FOLDER_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CONVERTIBLE_EXTS = ("bmp", "gif", "tif", "tiff")  # webdataset members converted to PNG
TABLE_FORMATS = {
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "tsv": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = (
    "image",
    "image_path",
    "path",
    "file",
    "filepath",
    "file_path",
    "filename",
    "file_name",
    "img",
    "bytes",
    "image_bytes",
    "jpg",
    "png",
    "webp",
)
CAPTION_COLUMNS = ("caption", "text", "txt", "alt", "alt_text", "title")
URL_COLUMNS = ("url", "image_url")
STORED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> stored as is
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
# img2dataset's per-sample bookkeeping in the .json: not carried into the pool's metadata
IMG2DATASET_FIELDS = frozenset({"key", "status", "error_message", "width", "height", "exif", "caption"})
RESERVED_COLUMNS = frozenset(BASE_SCHEMA.names)
NUM_SKIP_EXAMPLES = 10
# recorded in the pool's build settings: what import does to images with transparent pixels
TRANSPARENT_IMAGES = "composited onto white, as img2dataset (clipsift.images.white_background)"


# --------------------------------------------------------------------------- records


class Skip(Exception):
    """A sample that cannot be imported: `reason` is a short category, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail

    def entry(self, source: str) -> dict[str, str]:
        return {"source": source, "reason": self.reason, **({"detail": self.detail} if self.detail else {})}


@dataclass
class Record:
    """One input sample before its image is read and verified (`image` or `image_file` holds it)."""

    source: str
    uid: str | None = None
    caption: str | None = None
    image: bytes | None = None
    image_file: str | None = None
    url: str | None = None
    size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip: Skip | None = None


def _guarded(source: str, make: Callable[[], Record]) -> Record:
    """make() -> Record, or a Record that carries the Skip it raised."""
    try:
        return make()
    except Skip as skip:
        return Record(source, skip=skip)


def _clean_caption(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Skip("empty caption")
    text = str(value).strip()
    if not text:
        raise Skip("empty caption")
    return text


def _caption_text(data: bytes) -> str:
    try:
        return _clean_caption(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise Skip("caption is not UTF-8", str(err)) from None


def text_or_none(value: Any) -> str | None:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
    return text or None


def _size(width: Any, height: Any) -> tuple[int, int] | None:
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


def _source_uid(own: Any, url: str | None, fallback_id: str, caption: str) -> str:
    if is_valid_uid(own):
        return own
    return derive_uid(url) if url else derive_uid(f"{fallback_id}\n{caption}")


def _carried(name: str) -> str:
    return f"source_{name}" if name in RESERVED_COLUMNS else name


# --------------------------------------------------------------------------- sources


class _Source(Protocol):
    kind: ClassVar[str]
    fs: Any

    def num_shards(self) -> int: ...

    def staged(self, work: str) -> _Source: ...

    def records(self, index: int) -> Iterator[Record]: ...

    def info(self) -> dict[str, Any]: ...


def _stage(work: str, name: str, table: pa.Table, shard_size: int, shards: int) -> str:
    """`table`'s rows written to WORK/NAME, shard i's (rows [i*size, (i+1)*size)) as its own batch."""
    url = f"{work}/{name}"
    fs, folder = open_fs(work)
    fs.makedirs(folder, exist_ok=True)
    write_batches(url, table, np.arange(table.num_rows) // shard_size, shards)
    return url


@dataclass(frozen=True)
class _FolderSource:
    """Images under `root` with same-stem .txt captions; shard i holds sorted images [i*size, (i+1)*size)."""

    kind: ClassVar[str] = "folder"
    fs: Any
    root: str
    items: tuple[tuple[str, str | None], ...]  # (image path, caption path or None), relative to root, sorted
    shard_size: int
    count: int = 0  # images listed
    listing: str | None = None  # once staged: the listing's file, a batch per shard (`items` is then empty)

    def __post_init__(self) -> None:
        if self.listing is None:
            object.__setattr__(self, "count", len(self.items))

    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def staged(self, work: str) -> _FolderSource:
        """This source with its listing written to WORK/listing.arrow: the tasks, each given the source, then read
        their own shard's part of it, not the whole listing (about 200 B an image, in every worker)."""
        images = [rel for rel, _ in self.items]
        captions = [caption for _, caption in self.items]
        table = pa.table({"image": pa.array(images, pa.string()), "caption": pa.array(captions, pa.string())})
        url = _stage(work, "listing.arrow", table, self.shard_size, self.num_shards())
        return dataclasses.replace(self, items=(), listing=url)

    def _shard_items(self, index: int) -> Iterable[tuple[str, str | None]]:
        if self.listing is None:
            return self.items[index * self.shard_size : (index + 1) * self.shard_size]
        batch = read_batch(self.listing, index)
        return zip(batch.column("image").to_pylist(), batch.column("caption").to_pylist())

    def records(self, index: int) -> Iterator[Record]:
        for rel, caption_rel in self._shard_items(index):
            yield _guarded(rel, functools.partial(self._record, rel, caption_rel))

    def _record(self, rel: str, caption_rel: str | None) -> Record:
        if caption_rel is None:
            raise Skip("no caption file", f"expected {posixpath.splitext(rel)[0]}.txt beside the image")
        try:
            caption = _caption_text(self.fs.cat_file(f"{self.root}/{caption_rel}"))
        except OSError as err:
            raise Skip("unreadable caption file", str(err)) from None
        uid = derive_uid(f"{rel}\n{caption}")
        return Record(rel, uid, caption, image_file=f"{self.root}/{rel}", extra={"source": rel})

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "src": self.root, "num_inputs": self.count, "shard_size": self.shard_size}


@dataclass(frozen=True)
class _TableSource:
    """Rows of one table; shard i holds rows [i*size, (i+1)*size)."""

    kind: ClassVar[str] = "table"
    fs: Any
    path: str
    fmt: str
    num_rows: int
    shard_size: int
    image_column: str
    image_type: str  # "path", "bytes" or "struct" ({bytes, path})
    caption_column: str
    url_column: str | None
    uid_column: str | None
    size_columns: bool  # original_width/original_height columns give the sizes
    extra_columns: tuple[tuple[str, str], ...]  # (table column, pool column)

    rows_file: str | None = None  # once staged (CSV/TSV/JSONL): the parsed table's file, a batch per shard

    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_size)

    def staged(self, work: str) -> _TableSource:
        """A CSV/TSV/JSONL table parsed here once and written to WORK/table.arrow, a batch per shard: each task
        then reads its shard's rows, not the whole table (Parquet is read by row group already)."""
        if self.fmt == "parquet":
            return self
        url = _stage(
            work, "table.arrow", _read_text_table(self.fs, self.path, self.fmt), self.shard_size, self.num_shards()
        )
        _TEXT_TABLE_CACHE.clear()
        return dataclasses.replace(self, rows_file=url)

    def records(self, index: int) -> Iterator[Record]:
        start = index * self.shard_size
        if self.rows_file is None:
            rows = read_rows(self.fs, self.path, self.fmt, start, min(start + self.shard_size, self.num_rows))
        else:
            rows = read_batch(self.rows_file, index).to_pylist()
        name = posixpath.basename(self.path)
        for number, row in enumerate(rows, start):
            source = f"{name} row {number}"
            yield _guarded(source, functools.partial(self._record, source, row))

    def _record(self, source: str, row: dict[str, Any]) -> Record:
        caption = _clean_caption(row[self.caption_column])
        url = text_or_none(row[self.url_column]) if self.url_column else None
        image_path, data = self._image(row)
        fallback = image_path if data is None else hashlib.sha256(data).hexdigest()
        uid = _source_uid(row[self.uid_column] if self.uid_column else None, url, fallback, caption)
        size = _size(row["original_width"], row["original_height"]) if self.size_columns else None
        extra = {stored: row[column] for column, stored in self.extra_columns}
        image_file = None if data is not None else self._resolve(image_path)
        return Record(source, uid, caption, data, image_file, url, size, extra)

    def _image(self, row: dict[str, Any]) -> tuple[str | None, bytes | None]:
        value = row[self.image_column]
        if self.image_type == "struct":
            value = (value or {}).get("bytes") or (value or {}).get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return None, bytes(value)
        if isinstance(value, str) and value.strip():
            return value.strip(), None
        raise Skip("no image", f"column {self.image_column!r} is empty")

    def _resolve(self, image_path: str) -> str:
        if image_path.startswith("/") or "://" in image_path:
            return image_path
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.path), image_path))

    def info(self) -> dict[str, Any]:
        columns = {
            "image": self.image_column,
            "image_type": self.image_type,
            "caption": self.caption_column,
            "url": self.url_column,
            "uid": self.uid_column,
            "extra": [c for c, _ in self.extra_columns],
        }
        return {
            "kind": self.kind,
            "src": self.path,
            "format": self.fmt,
            "num_inputs": self.num_rows,
            "shard_size": self.shard_size,
            "columns": columns,
        }


@dataclass(frozen=True)
class _TarSource:
    """Webdataset tars (e.g. img2dataset output) under `root`; shard i is the i-th tar in sorted order."""

    kind: ClassVar[str] = "webdataset"
    fs: Any
    root: str
    tars: tuple[str, ...]  # relative to root, sorted

    def num_shards(self) -> int:
        return len(self.tars)

    def staged(self, work: str) -> _TarSource:
        return self  # a tar name a shard (O(shards))

    def records(self, index: int) -> Iterator[Record]:
        rel = self.tars[index]
        path = f"{self.root}/{rel}"
        with self.fs.open(path, "rb") as handle:
            for entry in iter_tar(handle, source=path):
                name = f"{rel}/{entry.key}"
                record = _guarded(name, functools.partial(tar_record, name, entry))
                if record.skip is None:
                    record.extra["source"] = name
                yield record

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "src": self.root, "num_inputs": len(self.tars)}


def tar_record(name: str, entry: TarEntry, *, keep_caption: bool = False) -> Record:
    """A webdataset entry (img2dataset's included) as a Record; raises Skip when it is unusable.

    keep_caption: the .txt member exactly as stored (not stripped), for a tar adopted unchanged; a blank one too,
    as DataComp's baselines keep such samples.
    """
    meta = entry_json(entry)
    txt = entry.members.get("txt")
    if txt is not None and keep_caption:
        try:
            caption = txt.decode("utf-8")
        except UnicodeDecodeError as err:
            raise Skip("caption is not UTF-8", str(err)) from None
    elif txt is not None:
        caption = _caption_text(txt)  # raises Skip when empty or not UTF-8
    elif keep_caption:
        raise Skip("no caption member", "an adopted tar needs a .txt member per sample")
    else:
        caption = _clean_caption(meta.get("caption"))
    image = image_member(entry) or next(((e, entry.members[e]) for e in CONVERTIBLE_EXTS if e in entry.members), None)
    if image is None:
        raise Skip("no image member", f"members: {', '.join(sorted(entry.members))}")
    url = text_or_none(meta.get("url"))
    uid = _source_uid(meta.get("uid"), url, name, caption)
    size = _size(meta.get("original_width"), meta.get("original_height"))
    extra = {k: v for k, v in meta.items() if k not in IMG2DATASET_FIELDS and k not in RESERVED_COLUMNS}
    if meta.get("sha256"):
        extra["source_sha256"] = meta["sha256"]
    return Record(name, uid, caption, image[1], None, url, size, extra)


def entry_json(entry: TarEntry) -> dict[str, Any]:
    try:
        meta = json.loads(entry.members.get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- opening a source


def open_source(
    src: str,
    out: str | None = None,
    *,
    kind: str | None = None,
    image_column: str | None = "image",
    caption_column: str | None = "caption",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> _Source:
    """Check `src` and plan its partition into shards; raises ClipsiftError on unusable input."""
    if kind is not None and kind not in KINDS:
        raise ClipsiftError(
            f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)} (or leave it out to detect it)"
        )
    if shard_size < 1:
        raise ClipsiftError(f"shard_size must be at least 1, not {shard_size}")
    fs, root = open_fs(os.path.abspath(src) if "://" not in src else src)
    if not fs.exists(root):
        raise ClipsiftError(
            f"{src}: no such file or folder; pass an image folder, a .parquet/.csv/.jsonl table or webdataset .tar "
            "file(s)"
        )
    is_dir = fs.isdir(root)
    if is_dir and out is not None:
        _check_out_outside(root, out)
    files = list_files(fs, root) if is_dir else []
    kind = kind or _detect_kind(fs, root, is_dir, files)
    if kind == "folder":
        return _open_folder(fs, root, is_dir, files, shard_size)
    if kind == "table":
        return _open_table(fs, root, is_dir, image_column, caption_column, shard_size)
    return _open_tars(fs, root, is_dir, files)


def _check_out_outside(root: str, out: str) -> None:
    if "://" in out:
        return
    out_abs = os.path.abspath(out)
    if out_abs == root or out_abs.startswith(root.rstrip("/") + "/"):
        raise ClipsiftError(f"{out}: the output pool is inside the source folder {root}; choose an --out outside it")


def list_files(fs: Any, root: str) -> list[str]:
    """Files under root, relative to it, sorted; hidden files and folders are left out."""
    rels = (path[len(root) + 1 :] for path in fs.find(root))
    return sorted(rel for rel in rels if rel and not any(part.startswith(".") for part in rel.split("/")))


def file_ext(path: str) -> str:
    return posixpath.splitext(path)[1][1:].lower()


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _detect_kind(fs: Any, root: str, is_dir: bool, files: list[str]) -> str:
    if is_dir:
        has_images = any(file_ext(f) in FOLDER_IMAGE_EXTS for f in files)
        return "webdataset" if not has_images and any(is_tar_name(f) for f in files) else "folder"
    if is_tar_name(root):
        return "webdataset"
    if file_ext(root) in TABLE_FORMATS:
        return "table"
    if _is_tar(fs, root):
        return "webdataset"
    raise ClipsiftError(
        f"{root}: cannot tell what kind of source this is from its name; use a folder of images, a "
        f"{'/'.join('.' + e for e in TABLE_FORMATS)} table or webdataset .tar files, or pass --kind"
    )


def _open_folder(fs: Any, root: str, is_dir: bool, files: list[str], shard_size: int) -> _FolderSource:
    if not is_dir:
        raise ClipsiftError(
            f"{root}: is a file, not a folder of images; pass the folder (or --kind table / webdataset)"
        )
    images = [f for f in files if file_ext(f) in FOLDER_IMAGE_EXTS]
    if not images:
        raise ClipsiftError(
            f"{root}: no image files ({', '.join('.' + e for e in FOLDER_IMAGE_EXTS)}) or .tar files found in this "
            "folder "
            "or its subfolders; point SRC at the folder that holds the images (each with a same-stem .txt caption)"
        )
    texts = {f for f in files if f.endswith(".txt")}
    items = tuple((f, c if (c := posixpath.splitext(f)[0] + ".txt") in texts else None) for f in images)
    return _FolderSource(fs, root, items, shard_size)


def _open_tars(fs: Any, root: str, is_dir: bool, files: list[str]) -> _TarSource:
    if is_dir:
        tars = tuple(f for f in files if is_tar_name(f))
        if not tars:
            raise ClipsiftError(
                f"{root}: no .tar files in this folder or its subfolders; a webdataset source is .tar files"
            )
        base = root
    else:
        base, name = posixpath.split(root)
        tars = (name,)
    for rel in tars:
        if not _is_tar(fs, f"{base}/{rel}"):
            raise ClipsiftError(
                f"{base}/{rel}: not a tar file; a webdataset source must be .tar files (e.g. img2dataset output with "
                "output_format webdataset): re-create or remove this file, or pass the right --kind"
            )
    return _TarSource(fs, base, tars)


def _is_tar(fs: Any, path: str) -> bool:
    try:
        with fs.open(path, "rb") as handle:
            return tarfile.is_tarfile(handle)
    except (OSError, tarfile.TarError, EOFError):
        return False


# --------------------------------------------------------------------------- tables


_TEXT_TABLE_CACHE: dict[tuple[str, str, str], pa.Table] = {}


def _table_error(path: str, fmt: str, err: Exception) -> ClipsiftError:
    return ClipsiftError(f"{path}: cannot read it as a {fmt} table ({err}); check the file (and its extension)")


def _read_text_table(fs: Any, path: str, fmt: str) -> pa.Table:
    """A CSV/TSV/JSONL table, parsed once per process (keyed by the file's checksum)."""
    key = (path, fmt, str(fs.checksum(path)))
    if key not in _TEXT_TABLE_CACHE:
        try:
            with fs.open(path, "rb") as handle:
                if fmt == "jsonl":
                    table = pa_json.read_json(handle)
                else:
                    parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
                    table = pa_csv.read_csv(handle, parse_options=parse)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise _table_error(path, fmt, err) from err
        _TEXT_TABLE_CACHE.clear()
        _TEXT_TABLE_CACHE[key] = table
    return _TEXT_TABLE_CACHE[key]


def read_table(fs: Any, path: str, fmt: str) -> pa.Table:
    """A whole Parquet/CSV/TSV/JSONL table; raises ClipsiftError naming the file when it cannot be read."""
    if fmt != "parquet":
        return _read_text_table(fs, path, fmt)
    try:
        return read_parquet(fs, path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _table_error(path, fmt, err) from err


def _table_shape(fs: Any, path: str, fmt: str) -> tuple[pa.Schema, int]:
    if fmt != "parquet":
        table = _read_text_table(fs, path, fmt)
        return table.schema, table.num_rows
    try:
        parquet = parquet_file(fs, path)
        return parquet.schema_arrow, parquet.metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as err:
        raise _table_error(path, fmt, err) from err


def read_rows(fs: Any, path: str, fmt: str, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows [start, stop) as dicts; for Parquet only the row groups that hold them are read."""
    if fmt != "parquet":
        return _read_text_table(fs, path, fmt).slice(start, stop - start).to_pylist()
    parquet = parquet_file(fs, path)
    groups, first, offset = [], 0, 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            first = offset if not groups else first
            groups.append(group)
        offset += rows
    return parquet.read_row_groups(groups, use_threads=False).slice(start - first, stop - start).to_pylist()


def pick_column(
    names: list[str], wanted: str | None, default: str, candidates: tuple[str, ...], path: str
) -> str | None:
    """The column asked for; when none or the default was asked for and it is absent, the first candidate present."""
    if wanted in names:
        return wanted
    if wanted is not None and wanted != default:
        raise ClipsiftError(f"{path}: no column {wanted!r}; the table's columns are: {', '.join(names)}")
    lower = {name.lower(): name for name in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _image_type(path: str, column: str, dtype: pa.DataType) -> str:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "path"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_fixed_size_binary(dtype):
        return "bytes"
    if pa.types.is_struct(dtype) and {"bytes", "path"} & {dtype.field(i).name for i in range(dtype.num_fields)}:
        return "struct"
    raise ClipsiftError(
        f"{path}: image column {column!r} has type {dtype}; it must hold image paths (strings) or image bytes"
    )


def _open_table(
    fs: Any, path: str, is_dir: bool, image_column: str | None, caption_column: str | None, shard_size: int
) -> _TableSource:
    fmt = TABLE_FORMATS.get(file_ext(path))
    if is_dir or fmt is None:
        raise ClipsiftError(f"{path}: a table source must be one {'/'.join('.' + e for e in TABLE_FORMATS)} file")
    schema, num_rows = _table_shape(fs, path, fmt)
    names = schema.names
    listed = ", ".join(names)
    caption = pick_column(names, caption_column, "caption", CAPTION_COLUMNS, path)
    if caption is None:
        raise ClipsiftError(
            f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); the table's columns are: "
            f"{listed}. Name it with --caption-column"
        )
    url = pick_column(names, None, "url", URL_COLUMNS, path)
    image = pick_column(names, image_column, "image", IMAGE_COLUMNS, path)
    if image is None:
        hint = "; it has urls only: download the images with `clipsift pool download`" if url else ""
        raise ClipsiftError(
            f"{path}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); the table's columns are: "
            f"{listed}. Name it with --image-column{hint}"
        )
    if num_rows == 0:
        raise ClipsiftError(f"{path}: the table has no rows")
    image_type = _image_type(path, image, schema.field(image).type)
    uid = "uid" if "uid" in names else None
    size_columns = "original_width" in names and "original_height" in names
    used = {caption, url, uid} | ({"original_width", "original_height"} if size_columns else set())
    used |= {image} if image_type != "path" else set()
    extra = tuple((n, _carried(n)) for n in names if n not in used)
    return _TableSource(fs, path, fmt, num_rows, shard_size, image, image_type, caption, url, uid, size_columns, extra)


# --------------------------------------------------------------------------- images


class VerifiedImage(NamedTuple):
    data: bytes  # to store
    ext: str
    size: tuple[int, int]  # (width, height)
    converted: bool  # another format stored as PNG
    composited: bool  # transparent pixels composited onto white (stored as PNG)


def verify_image(data: bytes) -> VerifiedImage:
    """Decode `data` fully, as training decodes it (`decode_rgb`); the bytes to store: the same bytes unless another
    format or transparent pixels."""
    try:
        img = open_image(data)
        to_rgb(img)  # a mode PIL loads but cannot make RGB would be dropped by training
        flat = white_background(img)
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError...)
        cause = err.__cause__ if isinstance(err, ImageDecodeError) else err
        message = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(cause))  # no object addresses: stats stay reproducible
        raise Skip("undecodable image", f"{type(cause).__name__}: {message}") from None
    ext = STORED_FORMATS.get(img.format or "")
    if flat is not None:
        return VerifiedImage(_png_bytes(flat), "png", img.size, ext is None, True)
    if ext:
        return VerifiedImage(data, ext, img.size, False, False)
    return VerifiedImage(_png_bytes(img), "png", img.size, True, False)


def _png_bytes(img: Image.Image) -> bytes:
    try:
        if img.mode not in PNG_MODES:
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
    except (OSError, ValueError) as err:
        raise Skip("cannot convert to PNG", f"{img.format} {img.mode}: {err}") from None
    return buffer.getvalue()


def _read_image_file(fs: Any, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise Skip("missing image file", path) from None
    except OSError as err:
        raise Skip("unreadable image file", f"{path}: {err}") from None


def _make_sample(fs: Any, record: Record) -> tuple[Sample, VerifiedImage]:
    data = record.image if record.image is not None else _read_image_file(fs, record.image_file)
    image = verify_image(data)
    width, height = record.size or image.size
    sample = Sample(record.uid, image.data, image.ext, record.caption, record.url, width, height, extra=record.extra)
    return sample, image


# --------------------------------------------------------------------------- building


UID_ROW_BYTES = 64  # a uid in the duplicate pass: 32 hex characters, its position and offsets
WORK_DIR = "import/work"  # POOL/import/work/<settings>/: the duplicate-uid pass's files, removed at the end


@dataclass(frozen=True)
class _UidMap:
    """Map task of the duplicate-uid pass: an input shard's uids (not those of inputs already known to be skipped)
    with their positions, partitioned by uid."""

    source: _Source
    partitions: int

    def __call__(self, index: int) -> tuple[pa.Table, np.ndarray]:
        uids = [None if record.skip else record.uid for record in self.source.records(index)]
        rows = np.array([i for i, uid in enumerate(uids) if uid is not None], np.int64)
        keys = strings_of([uid for uid in uids if uid is not None], pa.large_string())
        return keyed_rows(pa.table({"key": keys}), position(index, rows), hash_keys(keys), self.partitions)


def duplicate_uid_pass(source: _Source, work: str, shard_size: int, workers: int | None) -> Shuffle:
    """The inputs whose uid occurred earlier (by shard, then position), found by a hash-partitioned shuffle (each
    task holds one partition of the uids, none all of them); shard i's are `source_rows(shuffle.read(i)["pos"])`."""
    shards = source.num_shards()
    rows = shards * shard_size
    shuffle = Shuffle(
        f"{work}/uids",
        shards,
        partitions_for(rows, UID_ROW_BYTES),
        shards,
        map_group(shards, shard_size, UID_ROW_BYTES),
    )
    shuffle.run(_UidMap(source, shuffle.partitions), later_occurrences, desc=f"scan {source.kind}", workers=workers)
    return shuffle


@dataclass(frozen=True)
class _ImportShards:
    """Fills shard `index` of an import (a picklable callable for Ray tasks)."""

    source: _Source
    duplicates: Shuffle  # duplicate_uid_pass's

    def __call__(self, index: int, writer: ShardWriter) -> None:
        skipped: list[dict[str, str]] = []
        converted = composited = 0
        duplicates = set(source_rows(numpy_of(self.duplicates.read(index).column("pos"))).tolist())
        for row, record in enumerate(self.source.records(index)):
            skip = record.skip or (Skip("duplicate uid", record.uid or "") if row in duplicates else None)
            if skip is None:
                try:
                    sample, image = _make_sample(self.source.fs, record)
                except Skip as err:
                    skip = err
            if skip is not None:
                skipped.append(skip.entry(record.source))
                continue
            writer.write(sample)
            converted += image.converted
            composited += image.composited
        writer.stats.update(skipped=skipped, converted=converted, composited=composited)


@dataclass
class ImportResult:
    """What an import made: pool.json's content plus the totals of every shard's stats."""

    out: str
    kind: str
    src: str
    info: dict[str, Any]
    num_imported: int
    num_skipped: int
    num_converted: int
    num_composited: int  # images with transparent pixels composited onto white
    skip_reasons: dict[str, int]  # reason -> count, most frequent first
    skip_examples: list[dict[str, str]]  # the first few skipped inputs: {source, reason[, detail]}


def import_pool(
    src: str,
    out: str,
    *,
    kind: str | None = None,
    image_column: str | None = "image",
    caption_column: str | None = "caption",
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    name: str | None = None,
) -> ImportResult:
    """Import an image folder, a table or webdataset tars from `src` into the pool `out`.

    `kind` is "folder", "table" or "webdataset" (None: detected). For tables, the image and caption
    columns are detected among common names unless another column is named. Re-running the same
    import continues it: complete shards are kept.
    """
    source = open_source(
        src, out, kind=kind, image_column=image_column, caption_column=caption_column, shard_size=shard_size
    )

    shards = range(source.num_shards())
    source_info = source.info()
    params = {"kind": "import", "sources": [source_info], "transparent_images": TRANSPARENT_IMAGES}
    record_build_params(out, params)  # another source into this pool is refused before any scan
    work = f"{out.rstrip('/')}/{WORK_DIR}/{content_sha256(params)[:16]}"  # a pass of other settings is not reused
    source = source.staged(work)  # what every task is given: no listing or table of the whole source in it
    fill = _ImportShards(source, duplicate_uid_pass(source, work, shard_size, workers))
    info = build_pool(
        out,
        name=name or default_name(source_info["src"]),
        params=params,
        num_shards=len(shards),
        fill=fill,
        desc=f"import {source.kind}",
        workers=workers,
    )
    Shuffle(f"{out.rstrip('/')}/{WORK_DIR.split('/')[0]}", 0, 0, 0).remove()  # the work folder, whole
    return _result(out, source_info, info)


def default_name(src: str) -> str:
    base = posixpath.basename(src.rstrip("/"))
    for suffix in (*TAR_SUFFIXES, *(f".{e}" for e in TABLE_FORMATS)):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _result(out: str, source_info: dict[str, Any], info: dict[str, Any]) -> ImportResult:
    """The totals of every shard's stats, read one shard at a time (skipped inputs counted; the first few kept)."""
    pool = Pool(out)
    reasons: Counter[str] = Counter()
    examples: list[dict[str, str]] = []
    converted = composited = 0
    for shard in pool.shard_ids():
        stats = pool.shard_stats(shard)
        skipped = stats.get("skipped", [])
        reasons.update(entry["reason"] for entry in skipped)
        examples += skipped[: NUM_SKIP_EXAMPLES - len(examples)]
        converted += stats.get("converted", 0)
        composited += stats.get("composited", 0)
    return ImportResult(
        out=out,
        kind=source_info["kind"],
        src=source_info["src"],
        info=info,
        num_imported=info["num_samples"],
        num_skipped=sum(reasons.values()),
        num_converted=converted,
        num_composited=composited,
        skip_reasons=dict(reasons.most_common()),
        skip_examples=examples,
    )


def import_summary_rows(result: ImportResult, examples: int = 5) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: where from, where to, how many imported/skipped/converted and why."""
    rows: list[tuple[str, object]] = [
        ("pool", result.out),
        ("source", f"{result.src} ({result.kind})"),
        ("shards", result.info["num_shards"]),
        ("imported", result.num_imported),
        ("skipped", result.num_skipped),
    ]
    rows += [(f"  {reason}", count) for reason, count in result.skip_reasons.items()]
    if result.num_converted:
        rows.append(("converted to PNG", result.num_converted))
    if result.num_composited:
        rows.append(("composited onto white", result.num_composited))
    for entry in result.skip_examples[:examples]:
        detail = f" ({entry['detail']})" if entry.get("detail") else ""
        rows.append(("  e.g.", f"{entry['source']}: {entry['reason']}{detail}"))
    return rows
