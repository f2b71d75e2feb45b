"""external_score: a score per uid from any parquet (a model of your own, a published ranking), thresholded
like clip_score.

The file (or a folder of .parquet files) can be as large as the pool, so no process reads it whole: a
hash-partitioned join (pipeline/partition.py) meets its (uid, score) rows and the pool's input rows by uid.
A task per row group of the file and per pool shard writes its rows to partition files; a task per partition
matches them (and counts the uids the file lists twice, sending on a few examples: the driver sums one small
summary per partition); a task per shard then writes the shard's score array into the step's work folder, which
the threshold pass and `keep` read (filters/scores.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift.files import is_local_fs, open_fs, parquet_file
from clipsift.filters.base import Context, Filter, Inputs, RecipeError, ShardData, register, require
from clipsift.filters.dedup import input_rows
from clipsift.filters.scores import ScoreFiles, TopFraction
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.partition import (
    DEFAULT_BUDGET_MB,
    Shuffle,
    hash_keys,
    map_group,
    partitions_for,
    position,
    source_rows,
)
from clipsift.pipeline.pool import Pool

ROWS = pa.schema([("uid", pa.string()), ("pos", pa.int64()), ("side", pa.int8()), ("score", pa.float64())])
MATCHED = pa.schema(
    [
        ("uid", pa.string()),
        ("pos", pa.int64()),
        ("score", pa.float64()),
        ("found", pa.bool_()),
        ("repeats", pa.int64()),
    ]
)
REPEAT_EXAMPLES = 3  # repeated uids a partition names (it counts them all)
EXTERNAL, POOL_ROW = 0, 1  # sides of a shuffled row
ROW_BYTES = 72  # a shuffled row: a 32-hex uid, its position, side and score


@register
@dataclass
class ExternalScore(TopFraction, Filter):
    """Keep rows whose score in `path` (columns `uid_column`, `score_column`) is >= `threshold`, or the top
    `fraction` of the input (clip_score's semantics: filters/scores.py).

    uids are matched lower-cased (the pool's are lower-case hex). A null score is no score (never kept, ranked
    last). An input row whose uid the file lacks is an error naming the file, the count and an example
    (`missing: error`, the default), or gets the score `missing`. A uid listed twice in the file is an error.
    Scores are compared at the column's precision (float32 stays float32, other types become float64).

    Memory per process: one row group of the file, one pool shard, one partition (`budget_mb`, about 72 bytes a
    row of the file and of the input).
    """

    name = "external_score"
    summary = "a score per uid from a parquet file, above a threshold or in the top fraction"
    path: str
    threshold: float | None = None
    fraction: float | None = None
    uid_column: str = "uid"
    score_column: str = "score"
    missing: str | float = "error"
    budget_mb: float = DEFAULT_BUDGET_MB

    def validate(self, where: str) -> None:
        super().validate(where)
        require(
            not isinstance(self.missing, str) or self.missing == "error",
            where,
            f"parameter 'missing' must be error or a number (the score of a uid the file lacks), got {self.missing!r}",
        )
        require(self.budget_mb > 0, where, f"parameter 'budget_mb' must be > 0, got {self.budget_mb}")

    def check(self, pool: Pool, where: str) -> None:
        self.score_dtype(where)

    def sources(self) -> list[str]:
        return [self.path]

    def score_dtype(self, where: str) -> type:
        """float32 when every file's score column is float32, else float64; checks the files and columns."""
        dtypes = set()
        for url in parquet_files(self.path, where):
            schema = parquet_file(*open_fs(url)).schema_arrow
            for column in (self.uid_column, self.score_column):
                if column not in schema.names:
                    raise RecipeError(
                        f"{where}: {url} has no column {column!r} (it has {', '.join(schema.names)}); "
                        "name the columns with uid_column and score_column"
                    )
            kind = schema.field(self.score_column).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
                raise RecipeError(f"{where}: {url}: column {self.score_column!r} is {kind}, not a number")
            dtypes.add(np.float32 if pa.types.is_float32(kind) else np.float64)
        return np.float32 if dtypes == {np.float32} else np.float64

    def prepare(self, context: Context) -> Any:
        where = f"external_score {self.path}"
        dtype = self.score_dtype(where)
        files = ScoreFiles(f"{context.workdir}.scores")
        shards = context.shards()
        todo = [(number, shard) for number, shard in enumerate(shards) if not files.exists(shard)]
        if todo:
            groups = row_groups(parquet_files(self.path, where))
            in_pool = input_rows(context)
            rows = sum(count for _, _, count in groups) + in_pool
            # sources of two kinds, the file's row groups (up to about 1M rows) and the pool's shards
            largest = max([count for _, _, count in groups] + [in_pool / max(len(shards), 1)])
            shuffle = Shuffle(
                f"{files.folder}/shuffle",
                len(groups) + len(shards),
                partitions_for(rows, ROW_BYTES, self.budget_mb),
                len(shards) + 1,
                map_group(len(groups) + len(shards), largest, ROW_BYTES, self.budget_mb),
            )
            mapper = _ScoreRows(
                context.pool,
                context.inputs,
                tuple(shards),
                tuple(g[:2] for g in groups),
                self.uid_column,
                self.score_column,
                shuffle.partitions,
            )
            shuffle.run(
                mapper,
                _MatchUids(len(groups), len(shards)),
                desc=f"{where}: join",
                workers=context.workers,
                address=context.address,
            )
            self._refuse_repeats(shuffle.read(len(shards)), where)
            task = _ShardScores(files, shuffle, context.pool, np.dtype(dtype).name, self.missing)
            lacking = map_shards(task, todo, desc=f"{where}: scores", workers=context.workers, address=context.address)
            self._refuse_missing(lacking, where)
            shuffle.remove()
        return files.cutoff(self, context, dtype)

    def _refuse_repeats(self, summaries: pa.Table, where: str) -> None:
        """`summaries`: per partition, a few of its repeated uids, the first row carrying the partition's count."""
        count = int(np.sum(summaries.column("repeats").to_numpy())) if summaries.num_rows else 0
        if count:
            raise RecipeError(
                f"{where}: {count} uid(s) have more than one row in the file (e.g. "
                f"{summaries.column('uid')[0].as_py()}); give each uid one score"
            )

    def _refuse_missing(self, lacking: list[tuple[int, str | None]], where: str) -> None:
        count = sum(n for n, _ in lacking)
        if count and self.missing == "error":
            example = next(uid for n, uid in lacking if n)
            raise RecipeError(
                f"{where}: {count} input row(s) of the pool have no score in the file (e.g. uid {example}); "
                "add them, or give `missing:` a score for them"
            )

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return state.keep(data)


def parquet_files(path: str, where: str) -> list[str]:
    """`path` itself, or every .parquet file under the folder `path` (sorted)."""
    fs, root = open_fs(path)
    if not fs.exists(root):
        raise RecipeError(f"{where}: {path} does not exist (expected a parquet file of uid and score columns)")
    if not fs.isdir(root):
        return [path]
    found = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    if not found:
        raise RecipeError(f"{where}: {path} is a folder without .parquet files")
    return [p if is_local_fs(fs) else fs.unstrip_protocol(p) for p in found]


def row_groups(urls: list[str]) -> list[tuple[str, int, int]]:
    """(file, row group, rows) of every row group of the files: the map pass reads one at a time."""
    out = []
    for url in urls:
        meta = parquet_file(*open_fs(url)).metadata
        out += [(url, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return out


@dataclass(frozen=True)
class _ScoreRows:
    """Map task: row group `source` of the file (uid, score), or the input rows of shard `source - groups` (uid),
    partitioned by uid."""

    pool: Pool
    inputs: Inputs
    shards: tuple[str, ...]
    groups: tuple[tuple[str, int], ...]
    uid_column: str
    score_column: str
    partitions: int

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        if source < len(self.groups):
            url, group = self.groups[source]
            table = parquet_file(*open_fs(url)).read_row_group(group, columns=[self.uid_column, self.score_column])
            uids = pc.utf8_lower(table.column(self.uid_column).cast(pa.string()))
            scores = table.column(self.score_column).cast(pa.float64())
            rows, side = np.arange(len(uids)), EXTERNAL
        else:
            shard = self.shards[source - len(self.groups)]
            rows = np.flatnonzero(self.inputs.mask(shard))  # positions: the rows of the shard
            uids = self.pool.metadata(shard, ["uid"]).column("uid").take(pa.array(rows))
            scores, side = pa.nulls(len(rows), pa.float64()), POOL_ROW
        table = pa.table([uids, position(source, rows), np.full(len(rows), side, np.int8), scores], schema=ROWS)
        table = table.filter(table.column("uid").is_valid())
        return table, (hash_keys(table.column("uid")) % np.uint64(self.partitions)).astype(np.int64)


@dataclass(frozen=True)
class _MatchUids:
    """Reduce task: each pool row with its score (found or not), sent to its shard; and, sent to destination
    `shards`, up to REPEAT_EXAMPLES of the uids the file lists more than once, the first carrying their count (so
    the driver reads a few rows per partition, however many uids repeat)."""

    groups: int
    shards: int

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        side = table.column("side").to_numpy()
        external, pool = table.filter(pa.array(side == EXTERNAL)), table.filter(pa.array(side == POOL_ROW))
        counts = external.group_by("uid").aggregate([("uid", "count")])
        repeated = counts.column("uid").filter(pc.greater(counts.column("uid_count"), 1))
        examples = repeated.slice(0, REPEAT_EXAMPLES).combine_chunks().cast(pa.string())
        found = pc.index_in(pool.column("uid"), value_set=external.column("uid")).fill_null(-1).to_numpy()
        hit = found >= 0
        scores = np.full(len(found), np.nan)
        if hit.any():
            scores[hit] = external.column("score").take(pa.array(found[hit])).fill_null(np.nan).to_numpy()
        pos = pool.column("pos").to_numpy()
        tally = np.zeros(len(examples), np.int64)
        tally[:1] = len(repeated)
        result = pa.table(
            [
                pa.concat_arrays([pa.nulls(len(pos), pa.string()), examples]),
                pa.array(np.concatenate([pos, np.full(len(examples), -1, np.int64)])),
                pa.array(np.concatenate([scores, np.full(len(examples), np.nan)])),
                pa.array(np.concatenate([hit, np.zeros(len(examples), bool)])),
                pa.array(np.concatenate([np.zeros(len(pos), np.int64), tally])),
            ],
            schema=MATCHED,
        )
        destination = np.concatenate([(pos >> np.int64(32)) - self.groups, np.full(len(examples), self.shards)])
        return result, destination.astype(np.int64)


@dataclass(frozen=True)
class _ShardScores:
    """Last task per shard: its score array (NaN for rows not in the input) into the work folder; returns how many
    input rows the file lacks and one of their uids. With missing: error, a shard lacking some is not written."""

    files: ScoreFiles
    shuffle: Shuffle
    pool: Pool
    dtype: str
    missing: str | float

    def __call__(self, item: tuple[int, str]) -> tuple[int, str | None]:
        number, shard = item
        got = self.shuffle.read(number)
        rows = source_rows(got.column("pos").to_numpy())
        found = got.column("found").to_numpy(zero_copy_only=False)
        scores = np.full(self.pool.num_rows(shard), np.nan, self.dtype)
        scores[rows[found]] = got.column("score").to_numpy()[found]
        lacking = rows[~found]
        example = None
        if len(lacking):
            example = self.pool.metadata(shard, ["uid"]).column("uid")[int(lacking.min())].as_py()
            if self.missing == "error":
                return len(lacking), example
            scores[lacking] = self.missing
        self.files.write(shard, scores)
        return len(lacking), example
