"""Hash-partitioned shuffles on disk: how a global step groups rows by key without one process holding them all.

A shuffle has three passes, each a `map_shards` call (in this process while quick, Ray tasks otherwise):

1. map, one task per source (a shard, an input file): the caller's function turns the source into rows and a
   partition number per row; they are written to one Arrow IPC file per source, grouped by partition
   (map/SSSSSSSS.arrow; `write_batches`: each non-empty group one record batch or more, their spans in the
   schema metadata, so a file's footer grows with its rows, not with the group count).
2. reduce, one task per partition: the partition's group of every map file, concatenated, goes to the
   caller's function, which returns rows and a destination number per row; they are written to one IPC file
   per partition, grouped by destination (reduce/PPPPP.arrow).
3. whoever consumes destination d reads group d of every reduce file (`Shuffle.read`, `read_batch`).

Memory per process: one source's rows (map), one partition's rows (reduce: size partitions with
`partitions_for`), one destination's rows (read). A reduce opens every map file, so a shuffle opens sources x
partitions files; above GROUP_ABOVE sources (a pool of 1.28M shards would make 1.28M map files for each of
thousands of reduces) one map task takes a group of sources (`map_group`: as many as fill the budget, sized by
the largest source, with GROUP_ABOVE tasks at least) and writes one file for them. Every file is written to a
temporary name and renamed, so a killed shuffle re-run redoes only the files that are missing; a finished
reduce pass skips the map pass.

`hash_keys` spreads any key column over partitions; `first_occurrence` finds, exactly, the first row of
every key by a given order (keep-first in pool order).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift import ClipsiftError
from clipsift.arrays import arrow_of, numpy_filled, numpy_of
from clipsift.files import open_fs, write_atomic, write_json_atomic
from clipsift.hashing import splitmix64
from clipsift.pipeline.parallel import map_shards

MapFn = Callable[[int], tuple[pa.Table, np.ndarray]]  # source -> (rows, partition of each row)
ReduceFn = Callable[[int, pa.Table], tuple[pa.Table, np.ndarray]]  # partition, rows -> (rows, destination)

DEFAULT_BUDGET_MB = 128  # partition data one reduce task holds, by default
GROUP_ABOVE = 10_000  # sources up to which each has its own map file (and map task)


def partitions_for(rows: int, row_bytes: float, budget_mb: float = DEFAULT_BUDGET_MB) -> int:
    """How many partitions keep one partition of `rows` rows of `row_bytes` each within `budget_mb`."""
    return max(1, math.ceil(rows * row_bytes / (budget_mb * 2**20)))


def map_group(
    sources: int, source_rows: float | Callable[[], float], row_bytes: float, budget_mb: float = DEFAULT_BUDGET_MB
) -> int:
    """Sources per map task and file: 1 up to GROUP_ABOVE sources; above, as many as hold `budget_mb` of map output
    if each had `source_rows` rows of `row_bytes` (the largest source's rows where they differ; a function giving
    them is called only then), and no more than keep GROUP_ABOVE map tasks (so a filtered pool, little data a
    shard, still spreads over many tasks)."""
    if sources <= GROUP_ABOVE:
        return 1
    per_source = max((source_rows() if callable(source_rows) else source_rows) * row_bytes, 1.0)
    return max(1, min(int(budget_mb * 2**20 // per_source), -(-sources // max(GROUP_ABOVE, 1))))


def position(source: int, rows: np.ndarray) -> np.ndarray:
    """Global positions in source order: the source's number in the high 32 bits, the row in the low ones."""
    return (np.int64(source) << np.int64(32)) | np.asarray(rows, np.int64)


def source_rows(positions: np.ndarray) -> np.ndarray:
    """The rows (within their source) of global positions."""
    return np.asarray(positions, np.int64) & np.int64(0xFFFFFFFF)


def later_occurrences(partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """A reduce function: every row but the first of its key (all columns but `pos`, and `later`) by position, sent
    as its `pos` to its source (keep-first in source order, exact). Rows a map marked `later` (keyed_rows) are
    passed through."""
    pos = numpy_of(table.column("pos"))
    if "later" in table.column_names:  # marked rows sort after every other row of their key, and are never first
        marked = numpy_of(table.column("later"))
        order = np.where(marked, np.iinfo(np.int64).max, pos)
        first = first_occurrence(table.drop_columns(["pos", "later"]), order) & ~marked
    else:
        first = first_occurrence(table.drop_columns(["pos"]), pos)
    later = pos[~first].astype(np.int64)
    return pa.table({"pos": arrow_of(later)}), later >> np.int64(32)


def keyed_rows(keys: pa.Table, pos: np.ndarray, hashes: np.ndarray, partitions: int) -> tuple[pa.Table, np.ndarray]:
    """A map's (keys..., pos, later) rows for later_occurrences, and their partitions. A row whose key occurred
    earlier in this source is marked `later` and goes to a partition by its position, not its key: a key held by
    millions of rows (an empty caption, a placeholder image) then sends its partition one row per source, not all
    of them. Exact: candidates are rows whose 64-bit hash repeats here, compared by value."""
    pos = np.asarray(pos, np.int64)
    repeats = repeated(hashes)
    later = np.zeros(len(hashes), bool)
    if repeats.any():
        rows = np.flatnonzero(repeats)
        later[rows] = ~first_occurrence(keys.take(arrow_of(rows)), pos[rows])
    by_key = (hashes % np.uint64(partitions)).astype(np.int64)
    by_row = (splitmix64(pos.view(np.uint64)) % np.uint64(partitions)).astype(np.int64)
    table = keys.append_column("pos", arrow_of(pos)).append_column("later", arrow_of(later))
    return table, np.where(later, by_row, by_key)


def hash_keys(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 hash per value (strings, binary or integers), the same in every process and run; nulls hash to 0.

    Strings are read from the Arrow buffers as 8-byte words, all values of one length at once."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_integer(array.type):
        return splitmix64(numpy_filled(array, 0).astype(np.int64).view(np.uint64))
    if pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        array = array.cast(pa.large_binary())
    elif pa.types.is_large_string(array.type):
        array = array.cast(pa.large_binary())
    if not pa.types.is_large_binary(array.type):
        raise ClipsiftError(f"cannot partition by a column of type {array.type} (strings, binary or integers only)")
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    lengths = np.diff(offsets)
    start, end = (int(offsets[0]), int(offsets[-1])) if len(array) else (0, 0)
    data = np.frombuffer(array.buffers()[2], np.uint8)[start:end] if end > start else np.zeros(0, np.uint8)
    out = _word_hash(data, offsets[:-1] - start, lengths)
    out[~numpy_of(array.is_valid())] = 0
    return splitmix64(out)


def _word_hash(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each value's bytes read as little-endian 8-byte words (the last one zero-padded), folded word by word
    through the mixer, starting from its length: one gather per word place, for all values at once."""
    padded = np.zeros(len(data) + 8, np.uint8)
    padded[: len(data)] = data
    words = np.ndarray((len(data) + 1,), np.dtype("<u8"), padded.data, strides=(1,))  # a word at every byte
    out = lengths.astype(np.uint64)
    for place in range(0, int(lengths.max(initial=0)), 8):
        rows = np.flatnonzero(lengths > place)
        word = words[starts[rows] + place].astype(np.uint64)
        left = lengths[rows] - place
        short = left < 8
        word[short] &= (np.uint64(1) << (left[short] * 8).astype(np.uint64)) - np.uint64(1)
        out[rows] = splitmix64(out[rows] ^ word)
    return out


def repeated(hashes: np.ndarray) -> np.ndarray:
    """Whether each hash's high bits occur more than once (a superset of the repeated hashes): one value sort of
    the high bits packed above the row index, about twice as fast as an argsort."""
    shift = np.uint64(max(1, len(hashes).bit_length()))
    packed = (np.asarray(hashes, np.uint64) >> shift) << shift
    packed |= np.arange(len(hashes), dtype=np.uint64)
    packed.sort()
    same = (packed[1:] >> shift) == (packed[:-1] >> shift)
    rows = (packed & ((np.uint64(1) << shift) - np.uint64(1))).view(np.int64)
    out = np.zeros(len(hashes), bool)
    out[rows[1:][same]] = out[rows[:-1][same]] = True
    return out


def first_occurrence(keys: pa.Table, order: np.ndarray) -> np.ndarray:
    """Whether each row is the first of its key (every column of `keys` together) by `order` (ties: row order).

    Exact: keys are compared by value, not by hash."""
    if keys.num_rows == 0:
        return np.zeros(0, bool)
    names = keys.column_names
    table = keys.append_column("__order", arrow_of(np.asarray(order))).append_column(
        "__row", arrow_of(np.arange(keys.num_rows))
    )
    ranked = pc.sort_indices(table, sort_keys=[(n, "ascending") for n in [*names, "__order", "__row"]])
    ranked_np = numpy_of(ranked)
    first = np.ones(keys.num_rows, bool)
    if keys.num_rows > 1:
        same = np.ones(keys.num_rows - 1, bool)
        for name in names:
            column = keys.column(name).take(ranked)
            same &= numpy_filled(pc.equal(column.slice(1), column.slice(0, len(column) - 1)), False)
        first[1:] = ~same
    out = np.empty(keys.num_rows, bool)
    out[ranked_np] = first
    return out


GROUPS_KEY = b"clipsift.groups"  # the non-empty groups' (group, first batch, batches), int64, in the schema metadata
COUNT_KEY = b"clipsift.groups.count"
CHUNK_ROWS = 1 << 16  # rows per record batch at most


def grouped(table: pa.Table, groups: np.ndarray, count: int) -> tuple[pa.RecordBatch, np.ndarray]:
    """The rows ordered by group (0..count-1; their order kept within each), and the non-empty groups' spans as
    int64 rows (group, first row, rows): memory in the rows, whatever `count` is."""
    groups = np.asarray(groups, np.int64)
    if len(groups) != table.num_rows:
        raise ValueError(f"{len(groups)} group numbers for {table.num_rows} rows")
    if len(groups) and (groups.min() < 0 or groups.max() >= count):
        raise ValueError(f"group numbers must be in 0..{count - 1}")
    order = np.argsort(groups, kind="stable")
    present, first, rows = np.unique(groups[order], return_index=True, return_counts=True)
    spans = np.stack([present, first, rows], axis=1).astype(np.int64)
    return _one_batch(table.take(arrow_of(order)).combine_chunks()), spans


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    columns = [
        pa.concat_arrays(c.chunks) if c.num_chunks else pa.nulls(0, t)
        for c, t in zip(table.columns, table.schema.types)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=table.schema)


def write_batches(url: str, table: pa.Table, groups: np.ndarray, count: int) -> None:
    """An IPC file of `table`'s rows by group (0..count-1), read back one group at a time by `read_batch`
    (atomically written). Each non-empty group is one record batch or more (CHUNK_ROWS at most), and the groups'
    batch spans are in the schema's metadata: the footer grows with the non-empty groups, never with `count` (a
    batch per group made each file of a shuffle to 1.28M shards carry a 1.28M-entry footer)."""
    fs, path = open_fs(url)
    ordered, spans = grouped(table, groups, count)
    pieces, index = [], []
    for group, first, rows in spans.tolist():
        index.append((group, len(pieces), -(-rows // CHUNK_ROWS)))
        pieces += [
            ordered.slice(start, min(CHUNK_ROWS, first + rows - start))
            for start in range(first, first + rows, CHUNK_ROWS)
        ]
    metadata = {
        **(table.schema.metadata or {}),
        GROUPS_KEY: np.array(index, np.int64).reshape(-1, 3).tobytes(),
        COUNT_KEY: str(count).encode(),
    }
    schema = ordered.schema.with_metadata(metadata)

    def write(handle) -> None:
        with pa.ipc.new_file(handle, schema) as writer:
            for piece in pieces or [ordered]:  # one batch at least (empty): readers of the whole file want one
                writer.write_batch(piece.replace_schema_metadata(metadata))

    write_atomic(fs, path, write)


def read_batch(url: str, index: int) -> pa.RecordBatch:
    """Group `index`'s rows of a file written by `write_batches` (only the footer and its batches are read); files
    of the earlier layout (a record batch per group) are read as such."""
    fs, path = open_fs(url)
    with fs.open(path, "rb") as handle:
        reader = pa.ipc.open_file(handle)
        metadata = reader.schema.metadata or {}
        if GROUPS_KEY not in metadata:
            return _batch_of_old_layout(url, reader, index)
        count = int(metadata[COUNT_KEY])
        if not 0 <= index < count:
            raise ClipsiftError(
                f"{url} holds {count} groups, not {index + 1}; delete the step's work folder and run it again"
            )
        spans = np.frombuffer(metadata[GROUPS_KEY], np.int64).reshape(-1, 3)
        at = int(np.searchsorted(spans[:, 0], index))
        if at == len(spans) or spans[at, 0] != index:
            schema = reader.schema.remove_metadata()
            return pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)
        first, batches = int(spans[at, 1]), int(spans[at, 2])
        parts = [reader.get_batch(b).replace_schema_metadata(None) for b in range(first, first + batches)]
    return parts[0] if len(parts) == 1 else _one_batch(pa.Table.from_batches(parts))


def _batch_of_old_layout(url: str, reader: pa.ipc.RecordBatchFileReader, index: int) -> pa.RecordBatch:
    if not 0 <= index < reader.num_record_batches:
        raise ClipsiftError(
            f"{url} holds {reader.num_record_batches} batches, not {index + 1}; delete the step's work folder "
            "and run it again"
        )
    return reader.get_batch(index)


@dataclass(frozen=True)
class Shuffle:
    """A shuffle kept in `folder`: `sources` map files, `partitions` reduce files of `destinations` batches."""

    folder: str
    sources: int
    partitions: int
    destinations: int
    group: int = 1  # sources per map task and map file (`map_group`)

    @property
    def map_files(self) -> int:
        return -(-self.sources // self.group)

    def map_path(self, file: int) -> str:
        """Map file `file`: source `file`'s, or with groups, those of sources [file * group, (file + 1) * group)."""
        return f"{self.folder}/map/{file:08d}.arrow"

    def reduce_path(self, partition: int) -> str:
        return f"{self.folder}/reduce/{partition:05d}.arrow"

    def _exists(self, url: str) -> bool:
        fs, path = open_fs(url)
        return fs.exists(path)

    def start(self) -> None:
        """Record the plan; a folder holding another plan's files is emptied first (they would not line up)."""
        fs, root = open_fs(self.folder)
        plan = {"sources": self.sources, "partitions": self.partitions, "destinations": self.destinations}
        if self.group != 1:  # (plans of ungrouped shuffles are written as before: a resumed run still matches)
            plan["group"] = self.group
        if fs.exists(f"{root}/plan.json"):
            with fs.open(f"{root}/plan.json", "r") as handle:
                if json.load(handle) == plan:
                    return
            fs.rm(root, recursive=True)
        for sub in ("map", "reduce"):
            fs.makedirs(f"{root}/{sub}", exist_ok=True)
        write_json_atomic(fs, f"{root}/plan.json", plan)

    def run(
        self,
        map_fn: MapFn,
        reduce_fn: ReduceFn,
        *,
        desc: str,
        workers: int | None = None,
        address: str | None = None,
        gpus: tuple[float, float] = (0.0, 0.0),
        threads: bool = False,
        max_threads: int | None = None,
    ) -> None:
        """The map and reduce passes, each resuming where a killed run stopped (see the module's note). `gpus`: the
        share of a GPU each map and each reduce task asks for on a Ray cluster that has GPUs. `threads`: passes that
        run in this process use a thread per core (`map_shards`), for functions that are safe side by side;
        `max_threads`: at most this many tasks of a pass at once in this process (their data sized for that many)."""
        self.start()
        reduces = [p for p in range(self.partitions) if not self._exists(self.reduce_path(p))]
        if not reduces:
            return
        maps = [f for f in range(self.map_files) if not self._exists(self.map_path(f))]
        passes = (
            (functools.partial(_map_task, self, map_fn), maps, "map", gpus[0]),
            (functools.partial(_reduce_task, self, reduce_fn), reduces, "reduce", gpus[1]),
        )
        for task, items, name, share in passes:
            map_shards(
                task,
                items,
                desc=f"{desc}: {name}",
                workers=workers,
                address=address,
                gpus=share,
                threads=threads,
                max_threads=max_threads,
            )

    def partition(self, index: int) -> pa.Table:
        """Partition `index`: its batch of every map file."""
        return _gathered(read_batch(self.map_path(f), index) for f in range(self.map_files))

    def read(self, destination: int) -> pa.Table:
        """What the reduce pass sent to `destination`: its batch of every reduce file, in partition order."""
        return _gathered(read_batch(self.reduce_path(p), destination) for p in range(self.partitions))

    def remove(self) -> None:
        fs, root = open_fs(self.folder)
        if fs.exists(root):
            fs.rm(root, recursive=True)


GATHER_BATCHES = 1024  # batches held apart before they are joined into one: each costs about 4 KB of its own


def _gathered(batches: Iterable[pa.RecordBatch]) -> pa.Table:
    """The batches as one table, in order, holding their rows and at most GATHER_BATCHES batch objects: a reduce
    reads a batch from each of up to a million map files (about 4 GB of batch objects for a few rows each)."""
    joined: list[pa.RecordBatch] = []
    waiting: list[pa.RecordBatch] = []
    first = None
    for batch in batches:
        first = first if first is not None else batch
        if batch.num_rows:
            waiting.append(batch)
        if len(waiting) == GATHER_BATCHES:
            joined.append(_one_batch(pa.Table.from_batches(waiting)))
            waiting = []
    if first is None:
        return pa.table({})
    return pa.Table.from_batches(joined + waiting or [first])  # an empty one kept: a column of no chunks is a trap


def _map_task(shuffle: Shuffle, map_fn: MapFn, file: int) -> int:
    first = file * shuffle.group
    outputs = [map_fn(source) for source in range(first, min(first + shuffle.group, shuffle.sources))]
    if len(outputs) == 1:
        table, partition = outputs[0]
    else:
        table = pa.concat_tables([t for t, _ in outputs], promote_options="permissive")
        partition = np.concatenate([np.asarray(p, np.int64) for _, p in outputs])
    write_batches(shuffle.map_path(file), table, partition, shuffle.partitions)
    return table.num_rows


def _reduce_task(shuffle: Shuffle, reduce_fn: ReduceFn, partition: int) -> int:
    table, destination = reduce_fn(partition, shuffle.partition(partition))
    write_batches(shuffle.reduce_path(partition), table, destination, shuffle.destinations)
    return table.num_rows
