"""Writing one shard atomically: `ShardWriter` (tar, then parquet), `write_shard`, `adopt_shard` (an existing tar),
`write_metadata` (a parquet alone); a shard is complete exactly when its parquet exists."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.arrays import arrow_of, numpy_filled, string_scalar, strings_of
from clipsift.files import local_fd, open_fs, place_file, remove_if_present, tmp_name, write_atomic, write_parquet
from clipsift.pipeline.pool.layout import (
    BASE_COLUMNS,
    BASE_SCHEMA,
    IMAGE_EXTS,
    STATS_KEY,
    Sample,
    is_valid_uid,
    sample_key,
    shard_id,
)
from clipsift.pipeline.pool.tar_write import TarStream

_to_json = json.JSONEncoder(default=str).encode  # json.dumps(obj, default=str), without making an encoder per call


class ShardWriter:
    """Writes one shard (tar + parquet) atomically; use as a context manager.

    If the block raises, the temporary files are removed and no part of the shard is visible.
    """

    def __init__(self, pool_url: str, index: int):
        self.fs, self.root = open_fs(pool_url)
        self.index = index
        self.stats: dict[str, Any] = {}
        self._rows: list[dict[str, Any]] = []
        self._extra_keys: dict[str, None] = {}
        self._tables: list[pa.Table] = []  # rows written by write_rows (and the write() rows before them)
        self._written = 0

    def __enter__(self) -> ShardWriter:
        sid = shard_id(self.index)
        self.fs.makedirs(f"{self.root}/shards", exist_ok=True)
        self.fs.makedirs(f"{self.root}/metadata", exist_ok=True)
        self.tar_path = f"{self.root}/shards/{sid}.tar"
        self.parquet_path = f"{self.root}/metadata/{sid}.parquet"
        self._tar_tmp = tmp_name(self.tar_path)
        self._parquet_tmp = tmp_name(self.parquet_path)
        self._handle = self.fs.open(self._tar_tmp, "wb")
        self._tar = TarStream(self._handle, local_fd(self.fs, self._handle))
        return self

    def write(self, sample: Sample) -> None:
        if not is_valid_uid(sample.uid):
            raise ValueError(f"uid {sample.uid!r} is not 32 lowercase hex characters")
        if sample.ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {sample.ext!r} is not one of {IMAGE_EXTS}")
        key = sample.key or sample_key(self.index, len(self))
        row = {
            "uid": sample.uid,
            "key": key,
            "url": sample.url,
            "original_width": sample.original_width,
            "original_height": sample.original_height,
            "sha256": sample.sha256,
            **sample.extra,
        }
        self._tar.add(
            (f"{key}.{sample.ext}", sample.image),
            (f"{key}.txt", sample.text.encode("utf-8")),
            (f"{key}.json", _to_json(row).encode("utf-8")),
        )  # the .json member: the row without the caption
        row["text"] = sample.text
        self._rows.append(row)
        self._extra_keys.update(dict.fromkeys(sample.extra))
        self._written += 1

    def write_rows(self, rows: pa.Table, images: list[tuple[str, bytes | memoryview]]) -> None:
        """Write samples given column-wise: metadata `rows` (the base columns, any other column carried as an
        extra; their keys are replaced by new ones) and each row's image (extension, data). The bytes are
        those of write() for each sample; the .json members are built by Arrow (`json_members`)."""
        if len(images) != rows.num_rows:
            raise ValueError(f"{rows.num_rows} rows but {len(images)} images")
        uids = rows.column("uid")
        bad = ~numpy_filled(pc.match_substring_regex(uids, "^[0-9a-f]{32}$"), False)
        if bad.any():
            raise ValueError(f"uid {uids[int(bad.argmax())].as_py()!r} is not 32 lowercase hex characters")
        for ext in {ext for ext, _ in images} - set(IMAGE_EXTS):
            raise ValueError(f"image extension {ext!r} is not one of {IMAGE_EXTS}")
        if rows.column("text").null_count:
            raise ValueError(
                f"uid {uids.filter(pc.is_null(rows.column('text')))[0].as_py()!r} has no caption (null text)"
            )
        keys = [sample_key(self.index, n) for n in range(len(self), len(self) + rows.num_rows)]
        extra = [name for name in rows.column_names if name not in BASE_COLUMNS]
        columns = {name: rows.column(name).cast(BASE_SCHEMA.field(name).type) for name in BASE_SCHEMA.names}
        columns["key"] = pa.chunked_array([strings_of(keys)])
        sha256 = columns["sha256"]
        if sha256.null_count:  # as Sample does: the image's sha256 where the row has none
            given = sha256.to_pylist()
            columns["sha256"] = pa.chunked_array(
                [
                    strings_of(
                        [digest or hashlib.sha256(image).hexdigest() for digest, (_, image) in zip(given, images)]
                    )
                ]
            )
        table = pa.table({**columns, **{name: rows.column(name) for name in extra}})
        members = json_members(
            table.select(["uid", "key", "url", "original_width", "original_height", "sha256", *extra])
        )
        self._tar.add_samples(keys, images, table.column("text"), members)
        if self._rows:  # keep the order of rows written one by one before these
            self._tables.append(metadata_table(self._rows, {}, extra=list(self._extra_keys)))
            self._rows, self._extra_keys = [], {}
        self._tables.append(table)
        self._written += rows.num_rows

    def flush(self) -> None:
        """Write the tar members of the samples so far (needed before a sample's image buffer is reused)."""
        self._tar.flush()

    def __len__(self) -> int:
        return self._written

    def _table(self) -> pa.Table:
        if not self._tables:
            return metadata_table(self._rows, self.stats, extra=list(self._extra_keys))
        tables = [
            *self._tables,
            *([metadata_table(self._rows, {}, extra=list(self._extra_keys))] if self._rows else []),
        ]
        table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
        return table.replace_schema_metadata({STATS_KEY: json.dumps(self.stats, default=str).encode()})

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._handle.close()
            if exc_type is None:
                with self.fs.open(self._parquet_tmp, "wb") as handle:
                    write_parquet(self._table(), handle)
                self.fs.mv(self._tar_tmp, self.tar_path)
                self.fs.mv(self._parquet_tmp, self.parquet_path)
        finally:
            for tmp in (self._tar_tmp, self._parquet_tmp):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)


def metadata_table(
    rows: list[dict[str, Any]],
    stats: dict[str, Any],
    *,
    extra: list[str] | None = None,
    extra_types: dict[str, pa.DataType] | None = None,
) -> pa.Table:
    """A shard's metadata parquet table: the base columns, then `extra` columns (default: every key of
    `extra_types`, then every other key of the rows), typed by `extra_types` where given (so that every shard
    of a pool, even an empty one, gets the same schema), and `stats` in the key-value metadata."""
    extra_types = extra_types or {}
    if extra is None:
        extra = list(dict.fromkeys([*extra_types, *(k for row in rows for k in row if k not in BASE_COLUMNS)]))
    columns = {
        name: pa.array([r[name] for r in rows], type=BASE_SCHEMA.field(name).type) for name in BASE_SCHEMA.names
    }
    for name in extra:
        columns[name] = pa.array([r.get(name) for r in rows], type=extra_types.get(name))
    table = pa.table(columns)
    return table.replace_schema_metadata({STATS_KEY: json.dumps(stats, default=str).encode()})


_JSON_PLAIN = r"^[ !#-\[\]-~]*$"  # printable ASCII but the quote and the backslash: json.dumps keeps them as they are


def json_members(table: pa.Table) -> pa.Array:
    """json.dumps(row, default=str) of every row, as ShardWriter writes a sample's .json member, built column-wise
    by Arrow: strings that need no escaping, integers, booleans, nulls, floats and empty lists as they are; values
    of other types (lists such as DataComp's non-empty face_bboxes) each encoded by json alone, which is what
    json.dumps of the row writes for them; rows holding a top-level string that needs escaping are encoded row by
    row."""
    parts: list[Any] = []
    plain = np.ones(table.num_rows, bool)
    for name in table.column_names:
        column, kind = table.column(name), table.column(name).type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            plain &= numpy_filled(pc.match_substring_regex(column, _JSON_PLAIN), True)
            text = pc.binary_join_element_wise(_QUOTE, column, _QUOTE, _EMPTY)
        elif pa.types.is_integer(kind):
            text = column.cast(pa.string())
        elif pa.types.is_boolean(kind):
            text = pc.if_else(column, _TRUE, _FALSE)
        elif pa.types.is_null(kind):
            text = strings_of([None] * table.num_rows)
        elif pa.types.is_floating(kind):
            text = _float_json(column)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            text = _by_value(column, numpy_filled(pc.list_value_length(column), 1) > 0, "[]")
        else:
            text = _by_value(column, np.ones(table.num_rows, bool))
        parts += [string_scalar(("{" if not parts else ", ") + json.dumps(name) + ": "), pc.fill_null(text, _NULL)]
    if not parts:
        return strings_of([b"{}"] * table.num_rows, pa.binary())
    members = pc.binary_join_element_wise(*parts, _CLOSE, _EMPTY)
    members = (members.combine_chunks() if isinstance(members, pa.ChunkedArray) else members).cast(pa.binary())
    escaped = np.flatnonzero(~plain)
    if len(escaped):
        values = members.to_pylist()
        for index, row in zip(escaped.tolist(), table.take(arrow_of(escaped)).to_pylist()):
            values[index] = _to_json(row).encode("utf-8")
        members = strings_of(values, pa.binary())
    return members


# Arrow scalars made once: a Python value passed to a compute function is checked against pandas' types, which
# imports pandas (about 0.5 s a process)
_NULL, _CLOSE, _EMPTY, _POINT, _QUOTE, _TRUE, _FALSE = map(
    string_scalar, ("null", "}", "", ".0", '"', "true", "false")
)


def _float_json(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """json.dumps of each float (null stays null). Arrow's shortest round-trip digits are Python's repr for
    1e-4 <= |x| < 1e16 when Arrow writes them positionally ("1" for 1.0 gets its ".0"); any other value (an
    exponent, a NaN, an infinity) is encoded by json."""
    double = column.cast(pa.float64())
    text = double.cast(pa.string())
    size = np.abs(numpy_filled(double, 0.0))
    usable = ((size >= 1e-4) & (size < 1e16)) | (size == 0)
    usable &= ~numpy_filled(pc.match_substring(text, "e"), False)
    text = pc.if_else(pc.match_substring(text, "."), text, pc.binary_join_element_wise(text, _POINT, _EMPTY))
    return _by_value(double, ~usable, text)


def _by_value(column: pa.ChunkedArray | pa.Array, encode: np.ndarray, otherwise: Any = None) -> pa.Array:
    """json of each value where `encode` (nulls stay null), `otherwise` (a string or an array of them) elsewhere."""
    rows = np.flatnonzero(encode)
    if isinstance(otherwise, str) or otherwise is None:
        otherwise = strings_of([otherwise] * len(encode))
    else:
        otherwise = otherwise.combine_chunks() if isinstance(otherwise, pa.ChunkedArray) else otherwise
    if not len(rows):
        return otherwise
    values = otherwise.to_pylist()
    for row, value in zip(rows.tolist(), column.take(arrow_of(rows)).to_pylist()):
        values[row] = None if value is None else _to_json(value)
    return strings_of(values)


def adopt_shard(
    pool_url: str,
    index: int,
    tar_url: str,
    rows: list[dict[str, Any]],
    stats: dict[str, Any] | None = None,
    extra_types: dict[str, pa.DataType] | None = None,
) -> str:
    """Make shard `index` from an existing webdataset tar, unchanged, and its metadata `rows` (one per sample,
    in the tar's order, each key equal to the tar's). The tar is hard-linked, else symlinked, else copied
    (see `place_file`); returns which, also kept as stats["tar"]. Atomic like ShardWriter: tar renamed
    first, parquet last."""
    for row in rows:
        if not is_valid_uid(row["uid"]):
            raise ValueError(f"uid {row['uid']!r} of sample {row['key']!r} is not 32 lowercase hex characters")
    fs, root = open_fs(pool_url)
    src_fs, src = open_fs(tar_url)
    sid = shard_id(index)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.makedirs(f"{root}/metadata", exist_ok=True)
    tar_path, parquet_path = f"{root}/shards/{sid}.tar", f"{root}/metadata/{sid}.parquet"
    tar_tmp, parquet_tmp = tmp_name(tar_path), tmp_name(parquet_path)
    try:
        how = place_file(src_fs, src, fs, tar_tmp)
        table = metadata_table(rows, {**(stats or {}), "tar": how}, extra_types=extra_types)
        with fs.open(parquet_tmp, "wb") as handle:
            write_parquet(table, handle)
        fs.mv(tar_tmp, tar_path)
        fs.mv(parquet_tmp, parquet_path)
    finally:
        for tmp in (tar_tmp, parquet_tmp):
            remove_if_present(fs, tmp)
    return how


def write_shard(pool_url: str, index: int, samples: Iterable[Sample], stats: dict[str, Any] | None = None) -> int:
    """Write all `samples` as shard `index`; returns the number written."""
    with ShardWriter(pool_url, index) as writer:
        for sample in samples:
            writer.write(sample)
        writer.stats.update(stats or {})
    return len(writer)


def write_metadata(pool_url: str, index: int, table: pa.Table) -> str:
    """Write shard `index`'s metadata parquet alone, atomically: a metadata-only pool (no tars),
    such as DataComp's metadata before any image is downloaded; enough for `clipsift filter`."""
    missing = [name for name in BASE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"metadata table lacks column(s) {', '.join(missing)}")
    fs, root = open_fs(pool_url)
    fs.makedirs(f"{root}/metadata", exist_ok=True)
    path = f"{root}/metadata/{shard_id(index)}.parquet"
    write_atomic(fs, path, lambda handle: write_parquet(table, handle))
    return path


def shard_is_complete(pool_url: str, index: int) -> bool:
    fs, root = open_fs(pool_url)
    return fs.exists(f"{root}/metadata/{shard_id(index)}.parquet") and fs.exists(
        f"{root}/shards/{shard_id(index)}.tar"
    )
