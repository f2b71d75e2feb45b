"""Column sets: per-row values computed once per shard from a pool's samples and cached beside it.

Layout::

    POOL/columns/<name>/00000000.parquet   uid + the set's columns, one row per metadata row, same order

A column set is like an embeddings folder, for values that cost a pass over the images (image_quality's blur
and brightness, say) and that any number of recipes then read. Each file is written atomically and carries,
in its parquet key-value metadata (`COLUMN_SET_KEY`), the set's name and its `version`: the version of the
definition that computed it. A file whose version is not the current one, or whose row count is not the
shard's, is stale and gets computed again; `ColumnSet.read` checks that its uids are the metadata's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from clipsift.files import open_fs, parquet_file, read_parquet, write_atomic, write_parquet
from clipsift.pipeline.pool.layout import PoolFormatError
from clipsift.pipeline.pool.reader import Pool

COLUMNS_DIR = "columns"
COLUMN_SET_KEY = b"clipsift.column_set"  # the parquet key-value metadata: {"name", "version", ...}


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
        """Whether the shard's file exists, is of this name and version, and has the shard's row count."""
        stored = self.stored(shard)
        if stored is None or stored.get("name") != self.name or stored.get("version") != self.version:
            return False
        return pool.parquet_rows(pool.metadata_path(shard)) == self._rows(shard)

    def _rows(self, shard: str) -> int:
        return parquet_file(open_fs(self.folder)[0], self.path(shard)).metadata.num_rows

    def write(self, shard: str, table: pa.Table) -> str:
        """Write one shard's table (its first column `uid`) atomically, stamped with name and version."""
        fs, root = open_fs(self.folder)
        stamp = json.dumps({"name": self.name, "version": self.version, **dict(self.info)}, sort_keys=True)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), COLUMN_SET_KEY: stamp.encode()})
        fs.makedirs(root, exist_ok=True)
        path = self.path(shard)
        write_atomic(fs, path, lambda handle: write_parquet(table, handle))
        return path

    def read(self, pool: Pool, shard: str, columns: list[str]) -> pa.Table:
        """`columns` of the shard's file, after checking that its uids are the shard's metadata uids in order."""
        fs = open_fs(self.folder)[0]
        path = self.path(shard)
        table = read_parquet(fs, path, ["uid", *columns])
        if not table.column("uid").equals(pool.metadata(shard, ["uid"]).column("uid")):
            raise PoolFormatError(
                f"{path}: its rows do not match the metadata of shard {shard} (uids differ or are in another order); "
                f"delete it and run again to compute the {self.name} columns anew"
            )
        return table.select(columns)
