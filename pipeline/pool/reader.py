"""Reading a pool: `Pool` (info, shards, metadata, samples, embeddings) and samples from tar entries."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import pyarrow as pa

from clipsift.files import is_local_fs, open_fs, parquet_file, read_parquet, write_atomic, write_parquet
from clipsift.pipeline.pool.layout import (
    ABSENT_DIR,
    BASE_COLUMNS,
    IMAGE_EXTS,
    POOL_FORMAT,
    STATS_KEY,
    PoolFormatError,
    Sample,
)
from clipsift.pipeline.pool.tar_read import TarEntry, find_entries, owned, tar_windows


def _absolute(url: str) -> str:
    """A local path made absolute (so that it names the same folder from elsewhere); URLs as given; no trailing
    slash."""
    url = url.rstrip("/") or "/"
    return url if "://" in url else os.path.abspath(url)


class Pool:
    """Read access to a pool: its info, shard list, metadata tables and samples; and its embeddings.

    Embeddings live in POOL/embeddings/<model_id>/<shard>.parquet, or under another folder or URL
    given as `embeddings` (for a pool one cannot write to): <embeddings>/<model_id>/<shard>.parquet.
    """

    def __init__(self, url: str, embeddings: str | None = None):
        self.url = str(url)
        self.fs, self.root = open_fs(self.url)
        self.embeddings_url = _absolute(str(embeddings)) if embeddings else None  # None: inside the pool
        self.embeddings_fs, self.embeddings_root = (
            open_fs(self.embeddings_url) if embeddings else (self.fs, self.path("embeddings"))
        )

    @property
    def embeddings_home(self) -> str:
        """Where the embeddings folders are, as a path or URL to show users."""
        return self.embeddings_url or f"{self.url}/embeddings"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @cached_property
    def info(self) -> dict[str, Any]:
        path = self.path("pool.json")
        if not self.fs.exists(path):
            raise PoolFormatError(
                f"{self.url}: no pool.json, so this is not a clipsift pool (or its creation did not finish); "
                "create one with `clipsift pool synth`, `pool import` or `pool download`, or re-run the command that "
                "was making it"
            )
        with self.fs.open(path, "rb") as handle:
            info = json.load(handle)
        if info.get("format") != POOL_FORMAT:
            raise PoolFormatError(f"{path}: format is {info.get('format')!r}, expected {POOL_FORMAT!r}")
        return info

    def shard_ids(self) -> list[str]:
        """Shards whose metadata parquet exists, in order."""
        return sorted(
            p.rsplit("/", 1)[-1][: -len(".parquet")] for p in self.fs.glob(self.path("metadata", "*.parquet"))
        )

    def tar_ids(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1][: -len(".tar")] for p in self.fs.glob(self.path("shards", "*.tar")))

    def tar_path(self, shard: str) -> str:
        return self.path("shards", f"{shard}.tar")

    def metadata_path(self, shard: str) -> str:
        return self.path("metadata", f"{shard}.parquet")

    def metadata(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        path = self.metadata_path(shard)
        try:
            return read_parquet(self.fs, path, columns)
        except FileNotFoundError as err:
            raise PoolFormatError(f"{path}: missing metadata parquet for shard {shard}") from err
        except (pa.ArrowException, OSError) as err:
            raise PoolFormatError(f"{path}: unreadable metadata parquet ({err})") from err

    def absent_paths(self) -> list[str]:
        """POOL/absent/*.parquet: the source's metadata rows of samples this pool does not hold (a DataComp
        download's dead links), for rules defined over every listed row (DataComp's CLIP-score fraction)."""
        return sorted(self.fs.glob(self.path(ABSENT_DIR, "*.parquet")))

    def absent(self, path: str, columns: list[str]) -> pa.Table | None:
        """`columns` of one absent-rows file (from `absent_paths`); None when the file lacks one of them."""
        if not set(columns) <= set(parquet_file(self.fs, path).schema_arrow.names):
            return None
        try:
            return read_parquet(self.fs, path, columns)
        except (pa.ArrowException, OSError) as err:
            raise PoolFormatError(f"{path}: unreadable absent-rows parquet ({err})") from err

    def shard_stats(self, shard: str) -> dict[str, Any]:
        meta = parquet_file(self.fs, self.metadata_path(shard)).schema_arrow.metadata or {}
        return json.loads(meta.get(STATS_KEY, b"{}"))

    def num_rows(self, shard: str) -> int:
        return self.parquet_rows(self.metadata_path(shard))

    def parquet_rows(self, path: str) -> int:
        """Row count of any parquet file of the pool, from its footer."""
        return parquet_file(self.fs, path).metadata.num_rows

    def embedding_models(self) -> list[str]:
        """The model ids that have an embeddings folder."""
        fs = self.embeddings_fs
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{self.embeddings_root}/*") if fs.isdir(p))

    def embeddings_folder(self, model_id: str) -> str:
        """A model's embeddings folder (a path in `embeddings_fs`)."""
        return f"{self.embeddings_root}/{model_id}"

    def embeddings_path(self, model_id: str, shard: str) -> str:
        return f"{self.embeddings_folder(model_id)}/{shard}.parquet"

    def has_embeddings(self, model_id: str, shard: str) -> bool:
        return self.embeddings_fs.exists(self.embeddings_path(model_id, shard))

    def embeddings(self, model_id: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        """A shard's embeddings, rows in the shard's metadata order."""
        path = self.embeddings_path(model_id, shard)
        if not self.embeddings_fs.exists(path):
            known = ", ".join(self.embedding_models()) or "none"
            raise PoolFormatError(
                f"{path}: no embeddings of model {model_id!r} for shard {shard} (models scored: {known}); "
                f"run `{self.score_command} --model ...` first"
            )
        return read_parquet(self.embeddings_fs, path, columns)

    def embeddings_rows(self, model_id: str, shard: str) -> int:
        return parquet_file(self.embeddings_fs, self.embeddings_path(model_id, shard)).metadata.num_rows

    def write_embeddings(self, model_id: str, shard: str, table: pa.Table) -> str:
        """Write one shard's embeddings atomically to <embeddings>/<model_id>/<shard>.parquet."""
        self.embeddings_fs.makedirs(self.embeddings_folder(model_id), exist_ok=True)
        path = self.embeddings_path(model_id, shard)
        write_atomic(self.embeddings_fs, path, lambda handle: write_parquet(table, handle))
        return path

    @property
    def score_command(self) -> str:
        """The command that scores this pool into its embeddings folder (a model to be added)."""
        return f"clipsift score {self.url}" + (f" --out {self.embeddings_url}" if self.embeddings_url else "")

    def uids(self) -> pa.ChunkedArray:
        """Every uid of the pool in shard order, reading only the parquets' uid column."""
        chunks = [chunk for s in self.shard_ids() for chunk in self.metadata(s, ["uid"]).column("uid").chunks]
        return pa.chunked_array(chunks, type=pa.string())

    def entries(self, shard: str) -> Iterator[TarEntry]:
        """The raw tar entries of a shard, in stored order."""
        for window in self.entry_windows(shard):
            yield from map(owned, window)

    def entries_at(self, shard: str, keys: list[str]) -> dict[str, TarEntry]:
        """The shard's entries with these keys (given in tar order), without reading the others: a local tar is
        mapped and searched for their headers (`find_entries`); other tars are streamed up to the last key."""
        path = self.tar_path(shard)
        if is_local_fs(self.fs) and os.name == "posix" and self.fs.exists(path) and self.fs.size(path):
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                found = find_entries(mapped, keys, path)
            if found is not None:
                return found
        wanted, found = set(keys), {}
        for window in self.entry_windows(shard):
            found.update((entry.key, owned(entry)) for entry in window if entry.key in wanted)
            if len(found) == len(wanted):
                break
        return found

    @contextlib.contextmanager
    def mapped_tar(self, shard: str) -> Iterator[mmap.mmap | None]:
        """The shard's tar mapped whole and read in (MAP_POPULATE), or None for a tar that is not a non-empty local
        file."""
        path = self.tar_path(shard)
        if not (is_local_fs(self.fs) and os.name == "posix" and os.path.isfile(path) and os.path.getsize(path)):
            yield None
            return
        with open(path, "rb") as handle:
            mapped = mmap.mmap(
                handle.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ
            )
        try:
            yield mapped
        finally:
            try:
                mapped.close()
            except BufferError:  # views of it still held (by an exception's traceback): unmapped when they go
                pass

    def entry_windows(self, shard: str) -> Iterator[list[TarEntry]]:
        """The raw tar entries of a shard a window at a time, member data as views of a reused buffer
        (see `tar_windows`)."""
        path = self.tar_path(shard)
        try:
            handle = self.fs.open(path, "rb")
        except FileNotFoundError as err:
            raise PoolFormatError(f"{path}: missing tar for shard {shard}") from err
        with handle:
            yield from tar_windows(handle, source=path, mapped=is_local_fs(self.fs) and os.name == "posix")

    def samples(self, shard: str) -> Iterator[Sample]:
        """The shard's samples with their metadata rows; raises PoolFormatError if tar and parquet disagree."""
        rows = self.metadata(shard).to_pylist()
        position = -1
        for position, entry in enumerate(self.entries(shard)):
            if position >= len(rows) or rows[position]["key"] != entry.key:
                expected = rows[position]["key"] if position < len(rows) else "<end of metadata>"
                raise PoolFormatError(
                    f"{self.tar_path(shard)}: sample {position} has key {entry.key!r} but the metadata "
                    f"row says {expected!r}; tar and parquet are misaligned, rebuild this shard"
                )
            yield sample_from_entry(entry, rows[position], source=self.tar_path(shard))
        if position + 1 != len(rows):
            raise PoolFormatError(f"{self.tar_path(shard)}: tar has {position + 1} samples, metadata has {len(rows)}")


def image_member(entry: TarEntry) -> tuple[str, bytes] | None:
    """The (extension, bytes) of the entry's image member, if it has one."""
    for ext in (*IMAGE_EXTS, "jpeg"):
        if ext in entry.members:
            return ext, entry.members[ext]
    return None


def sample_from_entry(entry: TarEntry, row: dict[str, Any], source: str) -> Sample:
    image = image_member(entry)
    if image is None:
        raise PoolFormatError(f"{source}: sample {entry.key!r} has no image member (.jpg/.png/.webp)")
    return Sample(
        uid=row["uid"],
        image=image[1],
        ext=image[0],
        text=row["text"],
        url=row["url"],
        original_width=row["original_width"],
        original_height=row["original_height"],
        sha256=row["sha256"],
        extra={k: v for k, v in row.items() if k not in BASE_COLUMNS},
        key=entry.key,
    )
