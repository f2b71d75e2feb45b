"""Caption languages kept as a column set of the pool, so that language ID runs once per caption and model.

Language ID is the one caption measure that costs a model call per row (about 14 us with lid.176, 29 us with
CLD3), and every English-only recipe (basic, caption, text_based, laion2b...) asks it again. The labels a run
computes are kept at POOL/columns/language_<model>/<shard>.parquet (uid + `language`, null where no run has
needed that row yet); a later run reads them and identifies only the rows still missing. `<model>` names the
model by content (the fastText file's sha256, or gcld3's version), so another model file never reuses them.
Memory: one shard's labels at a time. A pool that cannot be written (read-only storage) is filtered without
the cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from importlib import metadata as dist_metadata

import numpy as np
import pyarrow as pa

from clipsift.arrays import numpy_of, strings_of
from clipsift.files import open_fs, read_parquet
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.pool.columns import ColumnSet, column_set_folder, uid_digest

VERSION = 1
CAPTIONS_KEY = b"clipsift.captions"  # sha256 of the captions the labels are for (caption_digest)
log = logging.getLogger(__name__)
_UNWRITABLE: set[str] = set()  # pools whose language column could not be written, in this process


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def model_label(identifier: str) -> str:
    """A folder-safe name for the model behind `identifier`: lid176_<sha12>, cld3_<gcld3 version>, <stem>_<sha12>."""
    from clipsift.filters.language_models import lid176_path

    if identifier == "cld3":
        for dist in ("cld3-py", "gcld3"):
            try:
                return f"cld3_{dist_metadata.version(dist)}"
            except dist_metadata.PackageNotFoundError:
                continue
        return "cld3"
    path = lid176_path() if identifier == "lid176" else identifier
    stat = os.stat(path)
    stem = "lid176" if identifier == "lid176" else re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(path))
    return f"{stem}_{_file_sha256(path, stat.st_size, stat.st_mtime_ns)[:12]}"


def language_column(pool: Pool, identifier: str) -> ColumnSet | None:
    """The pool's language column set for `identifier`, or None when this process found the pool unwritable."""
    if pool.url in _UNWRITABLE:
        return None
    name = f"language_{model_label(identifier)}"
    return ColumnSet(name, VERSION, column_set_folder(pool, name), (("language_id", identifier),))


def caption_digest(texts: pa.ChunkedArray) -> str:
    """sha256 of a shard's captions in order (their bytes, lengths and nulls, read from the Arrow buffers): labels
    kept for other captions under the same uids (a pool re-captioned in place) are stale."""
    array = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = array.cast(pa.string())
    _, offsets_buffer, data = array.buffers()
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, width)[array.offset : array.offset + len(array) + 1]
    digest = hashlib.sha256((offsets - offsets[0]).astype(np.int64).tobytes())
    digest.update(numpy_of(array.is_null()).tobytes())
    digest.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])] if data is not None else b"")
    return digest.hexdigest()


def stored_labels(column: ColumnSet, shard: str, uids: pa.ChunkedArray, texts: pa.ChunkedArray) -> np.ndarray:
    """The shard's labels as an object array (None where not identified yet); all None when the file is missing
    or stale (another version, or computed for other uids or captions)."""
    stored = column.stored(shard)
    fresh = stored is not None and (stored.get("name"), stored.get("version")) == (column.name, column.version)
    if not fresh or stored.get("uids") != uid_digest(uids):
        return np.full(len(uids), None, object)
    fs = open_fs(column.folder)[0]
    table = read_parquet(fs, column.path(shard), ["language"])
    if (table.schema.metadata or {}).get(CAPTIONS_KEY, b"").decode() != caption_digest(texts):
        return np.full(len(uids), None, object)
    return np.array(table.column("language").to_pylist(), dtype=object)


def save_labels(
    column: ColumnSet, pool: Pool, shard: str, uids: pa.ChunkedArray, texts: pa.ChunkedArray, labels: np.ndarray
) -> None:
    """Write the shard's labels (atomically); an unwritable pool turns the cache off for this process."""
    table = pa.table({"uid": uids, "language": strings_of(labels.tolist())})
    table = table.replace_schema_metadata({CAPTIONS_KEY: caption_digest(texts).encode()})
    try:
        column.write(shard, table)
    except OSError as err:
        _UNWRITABLE.add(pool.url)
        log.warning("%s: language labels not cached (%s); language ID runs again next time", column.folder, err)
