"""Column sets: per-row values computed once per shard from a pool's samples and cached beside it.

Layout::

    POOL/columns/<name>/00000000.parquet   uid + the set's columns, one row per metadata row, same order

A column set is like an embeddings folder, for values that cost a pass over the images (image_quality's blur
and brightness, say) and that any number of recipes then read. Each file is written atomically and carries,
in its parquet key-value metadata (`COLUMN_SET_KEY`), the set's name, its `version` (of the definition that
computed it) and `uids`, the sha256 of the uids it was computed for (`uid_digest`). A file whose version is not
the current one, or whose uids are not the shard's metadata uids (a pool rebuilt in place, a `folder` two pools
share), is stale and gets computed again; `ColumnSet.read` checks the uids once more against the rows it serves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from clipsift.files import open_fs, parquet_file, read_parquet, write_atomic, write_parquet
from clipsift.pipeline.pool.layout import PoolFormatError
from clipsift.pipeline.pool.reader import Pool

COLUMNS_DIR = "columns"
COLUMN_SET_KEY = b"clipsift.column_set"  # the parquet key-value metadata: {"name", "version", "uids", ...}


def uid_digest(uids: pa.ChunkedArray | pa.Array) -> str:
    """sha256 of a shard's uids in order (one per line): which rows a file was computed for."""
    return hashlib.sha256("\n".join(uids.to_pylist()).encode()).hexdigest()


def column_set_folder(pool: Pool, name: str) -> str:
    """Where a pool keeps column set `name` by default: POOL/columns/<name> (a path or URL)."""
    return f"{pool.url.rstrip('/')}/{COLUMNS_DIR}/{name}"


@dataclass(frozen=True)
class ColumnSet:
    """One column set of a pool, kept in `folder` (a path or fsspec URL), at definition `version`. `info` is
    recorded in every file's metadata beside name and version (the definition's settings, for people)."""

    name: str
    version: int
    folder: str
    info: tuple[tuple[str, Any], ...] = ()

    def path(self, shard: str) -> str:
        return f"{open_fs(self.folder)[1]}/{shard}.parquet"

    def stored(self, shard: str) -> dict[str, Any] | None:
        """The set's metadata in the shard's file, or None when there is no file (or not a readable one)."""
        fs = open_fs(self.folder)[0]
        path = self.path(shard)
        if not fs.exists(path):
            return None
        try:
            meta = parquet_file(fs, path).schema_arrow.metadata or {}
            return json.loads(meta.get(COLUMN_SET_KEY, b"{}"))
        except (pa.ArrowException, OSError, ValueError):  # a file cut short by hand: computed again
            return None

    def is_fresh(self, pool: Pool, shard: str) -> bool:
        """Whether the shard's file exists, is of this name and version, and was computed for the shard's uids."""
        stored = self.stored(shard)
        if stored is None or stored.get("name") != self.name or stored.get("version") != self.version:
            return False
        if pool.parquet_rows(pool.metadata_path(shard)) != self._rows(shard):  # cheap: the footers
            return False
        return stored.get("uids") == uid_digest(pool.metadata(shard, ["uid"]).column("uid"))

    def _rows(self, shard: str) -> int:
        return parquet_file(open_fs(self.folder)[0], self.path(shard)).metadata.num_rows

    def write(self, shard: str, table: pa.Table) -> str:
        """Write one shard's table (its first column `uid`) atomically, stamped with name, version and its uids."""
        fs, root = open_fs(self.folder)
        identity = {"name": self.name, "version": self.version, "uids": uid_digest(table.column("uid"))}
        stamp = json.dumps({**dict(self.info), **identity}, sort_keys=True)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), COLUMN_SET_KEY: stamp.encode()})
        fs.makedirs(root, exist_ok=True)
        path = self.path(shard)
        write_atomic(fs, path, lambda handle: write_parquet(table, handle))
        return path

    def read(self, shard: str, uids: pa.ChunkedArray, columns: list[str]) -> pa.Table:
        """`columns` of the shard's file, after checking that its uids are `uids` (the shard's metadata uids, which
        the caller has read already) in order."""
        fs = open_fs(self.folder)[0]
        path = self.path(shard)
        table = read_parquet(fs, path, ["uid", *columns])
        if not table.column("uid").equals(uids):
            raise PoolFormatError(
                f"{path}: its rows do not match the metadata of shard {shard} (uids differ or are in another order); "
                f"delete it and run again to compute the {self.name} columns anew"
            )
        return table.select(columns)
