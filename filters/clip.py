"""Filters on the CLIP score (cosine of image and text embeddings) of a scored model: clip_score, laion2b.

Where the scores come from (`scores`): `auto` takes the column DataComp published for the model when
the pool's metadata has it (`clip_l14_similarity_score` for ViT-L-14__openai, `clip_b32_similarity_score`
for ViT-B-32__openai: what DataComp's baselines threshold), else the embeddings' clip_score;
`embeddings` always the embeddings; any other value names a metadata column. Scores are compared at
the column's own precision (float32 for DataComp's columns), as pandas compares them in DataComp's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift.arrays import numpy_filled
from clipsift.files import parquet_file
from clipsift.filters.base import Context, Filter, RecipeError, ShardData, register
from clipsift.filters.metadata import check_language_id, language_ok
from clipsift.filters.scores import TopFraction, at_least
from clipsift.pipeline.pool import Pool

DATACOMP_SCORE_COLUMNS = {
    "ViT-L-14__openai": "clip_l14_similarity_score",
    "ViT-B-32__openai": "clip_b32_similarity_score",
}


def metadata_schema(pool: Pool) -> pa.Schema | None:
    shards = pool.shard_ids()
    return parquet_file(pool.fs, pool.metadata_path(shards[0])).schema_arrow if shards else None


def score_column(scores: str, model_id: str, pool: Pool, where: str) -> str | None:
    """The metadata column holding the scores (see the module doc), None for the embeddings' clip_score."""
    if scores == "embeddings":
        return None
    schema = metadata_schema(pool)
    names = schema.names if schema is not None else []
    if scores == "auto":
        column = DATACOMP_SCORE_COLUMNS.get(model_id)
        return column if column in names else None
    if schema is not None and scores not in names:
        raise RecipeError(
            f"{where}: scores {scores!r} is not a metadata column of {pool.url} "
            f"(use auto, embeddings, or one of {', '.join(schema.names)})"
        )
    if schema is not None and not pa.types.is_floating(schema.field(scores).type):
        raise RecipeError(f"{where}: metadata column {scores!r} is {schema.field(scores).type}, not a float score")
    return scores


def column_scores(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A float column as numpy at its own precision (float64 stays float64), NaN where null."""
    dtype = np.float64 if pa.types.is_float64(values.type) else np.float32
    if values.null_count:
        values = values.cast(pa.float64())
    return numpy_filled(values, np.nan).astype(dtype, copy=False)


def shard_scores(data: ShardData, model_id: str, column: str | None) -> np.ndarray:
    return data.scores(model_id) if column is None else column_scores(data.column(column))


def absent_rows(pool: Pool, column: str) -> int:
    """How many rows POOL/absent/ holds with a `column` (from the parquet footers)."""
    return sum(
        pool.parquet_rows(path)
        for path in pool.absent_paths()
        if column in parquet_file(pool.fs, path).schema_arrow.names
    )


def absent_scores(pool: Pool, column: str) -> Iterator[np.ndarray]:
    """The scores of the rows the pool's source listed but the pool lacks (POOL/absent/), file by file."""
    for path in pool.absent_paths():
        table = pool.absent(path, [column])
        if table is not None:
            yield column_scores(table.column(column))


@dataclass
class ScoreSource:
    """What clip_score, laion2b and weight's score_quantile share: `scores` resolved against the pool (by `check`,
    else when first needed; the resolved column travels with the filter to the per-shard tasks), and the threshold
    pass over those scores (`top_cutoff`)."""

    def resolve(self, pool: Pool, where: str) -> str | None:
        self._column = score_column(self.scores, self.model_id, pool, where)  # type: ignore[attr-defined]
        return self._column

    def column(self, pool: Pool) -> str | None:
        return self._column if hasattr(self, "_column") else self.resolve(pool, self.name)  # type: ignore

    def models(self) -> list[str]:
        resolved = getattr(self, "_column", None) is not None
        return [] if resolved or self.scores not in ("auto", "embeddings") else [self.model_id]  # type: ignore

    def top_cutoff(self, cut: TopFraction, context: Context, count_absent: bool) -> float:
        """`cut`'s threshold (TopFraction.cutoff) over these scores of the step's input, compared at the scores'
        precision (float64 for a float64 metadata column, else float32). With `count_absent`, when the step sees
        the whole pool and the scores are a metadata column, the pool's absent rows count too (see ClipScore)."""
        column = self.column(context.pool)
        absent = column is not None and count_absent and context.inputs.whole_pool
        schema = metadata_schema(context.pool) if column else None
        dtype = np.float64 if schema is not None and pa.types.is_float64(schema.field(column).type) else np.float32
        return cut.cutoff(
            context,
            lambda data: shard_scores(data, self.model_id, column),  # type: ignore[attr-defined]
            dtype,
            extra_rows=absent_rows(context.pool, column) if absent else 0,
            extra=(lambda: absent_scores(context.pool, column)) if absent else None,
        )


@register
@dataclass
class ClipScore(TopFraction, ScoreSource, Filter):
    """Keep rows whose score under `model_id` is >= `threshold`, or the top `fraction` of the input.

    fraction has DataComp's semantics: threshold = the score at rank int(N * fraction) of the input
    sorted descending, N counting every input row (rows without a score rank last); ties at the
    threshold are all kept. When the step sees the whole pool and the scores are a metadata column,
    the rows the pool lacks but its source listed (a DataComp download's dead links, POOL/absent/)
    count too (`count_absent`), as DataComp's threshold counts every metadata row. The threshold is
    found in a first pass that reads only the score column (exact, in bounded memory:
    filters/quantile.py), then rows are filtered shard by shard.
    """

    name = "clip_score"
    summary = "CLIP score above a threshold or in the top fraction"
    model_id: str
    threshold: float | None = None
    fraction: float | None = None
    scores: str = "auto"
    count_absent: bool = True

    def check(self, pool: Pool, where: str) -> None:
        self.resolve(pool, where)

    def prepare(self, context: Context) -> Any:
        """The threshold (a float: the report reads it)."""
        if self.fraction is None:
            return self.threshold
        return self.top_cutoff(self, context, self.count_absent)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return at_least(shard_scores(data, self.model_id, self.column(data.pool)), state)


@register
@dataclass
class Laion2b(ScoreSource, Filter):
    """LAION-2B's rule as DataComp reproduced it: English caption by CLD3 (`language_id: cld3`, gcld3 as
    DataComp calls it) and ViT-B/32 CLIP score >= 0.28."""

    name = "laion2b"
    columns = ("text",)
    summary = "English (CLD3) and B/32 CLIP score >= 0.28"
    model_id: str = "ViT-B-32__openai"
    threshold: float = 0.28
    language: str | None = "en"
    language_id: str = "cld3"
    scores: str = "auto"

    def check(self, pool: Pool, where: str) -> None:
        self.resolve(pool, where)
        check_language_id(self.language, self.language_id, where)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        scored = rows & at_least(shard_scores(data, self.model_id, self.column(data.pool)), self.threshold)
        return language_ok(data, self.language, scored, self.language_id)
