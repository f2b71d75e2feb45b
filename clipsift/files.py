"""Generic file helpers: filesystems from paths or fsspec URLs, atomic writes, parquet files, digests.

Nothing here knows about pools; any layer of clipsift may use it (it imports no other clipsift module).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def tmp_name(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    # Through a pyarrow filesystem, not a Python file object: pyarrow 26 can abort the interpreter at exit
    # after threaded reads from Python file objects. Local files through pyarrow's own (no Python in the
    # reads: about a third faster for string columns), others through its wrapper of the fsspec filesystem.
    # ParquetFile rather than read_table: the same reads without importing pyarrow.dataset (and pandas), a
    # quarter of a second of every command's start-up.
    file = pq.ParquetFile(path, filesystem=_LOCAL_ARROW_FS if is_local_fs(fs) else fs)
    names = file.schema_arrow.names
    missing = [c for c in columns or () if c.split(".")[0] not in names]
    if missing:  # ParquetFile.read would leave them out without a word
        raise pa.ArrowInvalid(f"{path} has no column(s) {', '.join(missing)} (it has: {', '.join(names)})")
    return file.read(columns=columns)


_LOCAL_ARROW_FS = pafs.LocalFileSystem()


def parquet_file(fs: fsspec.AbstractFileSystem, path: str) -> pq.ParquetFile:
    """A ParquetFile for footer-only reads (row counts, row groups, schema metadata)."""
    return pq.ParquetFile(path, filesystem=fs, pre_buffer=False)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None]) -> None:
    """Write `path` through a temporary file that is renamed into place only when complete."""
    tmp = tmp_name(path)
    try:
        with fs.open(tmp, "wb") as handle:
            write(handle)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


PARQUET_COMPRESSION = "lz4"  # LZ4_RAW: files about the size of pyarrow's default snappy, decoded about twice as fast


def write_parquet(table: pa.Table, handle: Any) -> None:
    """Write a parquet file (a pool's metadata or embeddings) with PARQUET_COMPRESSION. LZ4_RAW is a codec of the
    Parquet format since 2.9 (2021): pyarrow, and so pandas, read it. Floating-point columns (scores, embedding
    vectors) are written without a dictionary: their values rarely repeat, and dictionary-encoded float16 vectors
    read about 5x slower (bench/pool_io.py) for files of the same size."""
    pq.write_table(table, handle, compression=PARQUET_COMPRESSION, use_dictionary=dictionary_columns(table.schema))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth a dictionary: all but floating-point ones (and lists of them)."""

    def floating(kind: pa.DataType) -> bool:
        while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
            kind = kind.value_type
        return pa.types.is_floating(kind)

    return [field.name for field in schema if not floating(field.type)]


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"
    write_atomic(fs, path, lambda handle: handle.write(data))


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The sha256 hex digest of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol


def place_file(src_fs: fsspec.AbstractFileSystem, src: str, fs: fsspec.AbstractFileSystem, dst: str) -> str:
    """Put `src` at `dst` without copying where possible: a hard link, else a symlink (both local), else a copy."""
    if is_local_fs(src_fs) and is_local_fs(fs):
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:  # another filesystem, or links not allowed there
            os.symlink(os.path.abspath(src), dst)
            return "symlink"
    with src_fs.open(src, "rb") as source, fs.open(dst, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 22)
    return "copy"


def remove_if_present(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if is_local_fs(fs):
        if os.path.lexists(path):  # a dangling symlink too
            os.remove(path)
    elif fs.exists(path):
        fs.rm(path)


def local_fd(fs: fsspec.AbstractFileSystem, handle: Any) -> int | None:
    """The descriptor to os.writev to, for a file of the local filesystem opened for writing (else None)."""
    return handle.fileno() if is_local_fs(fs) and hasattr(os, "writev") else None


def content_sha256(record: dict[str, Any], *, leave_out: tuple[str, ...] = ("created", "updated")) -> str:
    """sha256 of a JSON record without its timestamps: the identity of what it describes."""
    import hashlib
    import json

    kept = {key: value for key, value in record.items() if key not in leave_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
