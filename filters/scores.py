"""What score filters share: "score >= threshold, or the top fraction of the input", and per-shard score files.

`TopFraction` gives a filter clip_score's two parameters and semantics: exactly one of `threshold` and
`fraction`; with a fraction, the threshold is DataComp's (the score at rank int(N * fraction) of the input sorted
descending, N counting every input row, rows without a score ranked last; ties at the threshold all kept), found
exactly in bounded memory by filters/quantile.py from the scores streamed shard by shard.

`ScoreFiles` keeps a score per row, one .npy per shard, in a step's work folder, for filters whose scores cost
too much to compute twice (negCLIPLoss, NormSim) or need a global pass (external scores): `prepare` writes every
shard's file in per-shard tasks (`compute`), the threshold pass and each `keep` read them back. Files are written
atomically and kept across a re-run: the work folder is named by the recipe's fingerprint, which covers the
parameters and a stamp of every file the filter reads (`Filter.sources`), so a changed input gets a fresh folder.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from clipsift.files import open_fs, write_atomic
from clipsift.filters.base import Context, Inputs, RecipeError, ShardData, require
from clipsift.filters.quantile import top_fraction_threshold
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import Pool

ShardScorer = Callable[[ShardData, np.ndarray], np.ndarray]  # (shard, input rows) -> a score per row, NaN: none


def at_least(scores: np.ndarray, threshold: float) -> np.ndarray:
    """score >= threshold at the scores' own precision (a stored float32 0.28 passes 0.28); NaN never passes."""
    with np.errstate(invalid="ignore"):
        return scores >= scores.dtype.type(threshold)


class TopFraction:
    """Mixin of a filter dataclass with fields `threshold` and `fraction` (float | None, exactly one given)."""

    threshold: float | None
    fraction: float | None

    def validate(self, where: str) -> None:
        if (self.threshold is None) == (self.fraction is None):
            raise RecipeError(f"{where}: give exactly one of 'threshold' and 'fraction'")
        if self.fraction is not None:
            require(0.0 <= self.fraction <= 1.0, where, f"parameter 'fraction' must be in [0, 1], got {self.fraction}")

    def cutoff(
        self,
        context: Context,
        scores: Callable[[ShardData], np.ndarray],
        dtype: type = np.float32,
        extra_rows: int = 0,
        extra: Callable[[], Iterable[np.ndarray]] | None = None,
    ) -> float:
        """The threshold: `threshold`, or DataComp's for `fraction` over the step's input rows, whose scores are
        `scores(shard)[input rows]` (NaN: no score), compared at `dtype`. `extra_rows` more rows count in N, their
        scores yielded by `extra()` (clip_score's absent rows). No input row: +inf (nothing passes)."""
        if self.fraction is None:
            return self.threshold
        num_rows = sum(int(rows.sum()) for _, rows in context.iter_data()) + extra_rows
        if num_rows == 0:
            return float("inf")

        def batches() -> Iterator[np.ndarray]:
            for data, rows in context.iter_data():
                yield scores(data)[rows]
            if extra is not None:
                yield from extra()

        return top_fraction_threshold(batches, num_rows, self.fraction, dtype=dtype)


@dataclass(frozen=True)
class ScoreFiles:
    """One score array per shard (float, a value per metadata row, NaN: no score) in `folder`."""

    folder: str

    def path(self, shard: str) -> str:
        return f"{open_fs(self.folder)[1]}/{shard}.npy"

    def exists(self, shard: str) -> bool:
        fs, _ = open_fs(self.folder)
        return fs.exists(self.path(shard))

    def read(self, shard: str) -> np.ndarray:
        fs, _ = open_fs(self.folder)
        with fs.open(self.path(shard), "rb") as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)

    def write(self, shard: str, scores: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, scores)
        fs, root = open_fs(self.folder)
        fs.makedirs(root, exist_ok=True)
        write_atomic(fs, self.path(shard), lambda handle: handle.write(buffer.getvalue()))

    def compute(self, context: Context, scorer: ShardScorer, desc: str) -> None:
        """Write the file of every shard that has none, one task per shard (`scorer` goes to the tasks once)."""
        todo = [shard for shard in context.shards() if not self.exists(shard)]
        task = functools.partial(_score_shard, self, context.pool, context.inputs, scorer)
        map_shards(task, todo, desc=desc, workers=context.workers, address=context.address)

    def cutoff(self, owner: TopFraction, context: Context, dtype: type = np.float32) -> ScoreCutoff:
        """The step's state: these files and `owner`'s threshold over them."""
        return ScoreCutoff(self, owner.cutoff(context, lambda data: self.read(data.shard), dtype=dtype))


def _score_shard(files: ScoreFiles, pool: Pool, inputs: Inputs, scorer: ShardScorer, shard: str) -> int:
    rows = inputs.mask(shard)
    scores = np.asarray(scorer(ShardData(pool, shard), rows))
    if scores.shape != rows.shape:
        raise ValueError(f"shard {shard}: {scores.shape[0]} scores for {len(rows)} rows")
    scores = np.where(rows, scores, np.nan).astype(scores.dtype)  # only the input rows have a score
    files.write(shard, scores)
    return int(rows.sum())


@dataclass(frozen=True)
class ScoreCutoff:
    """A cached-score step's state: where the scores are and the threshold (the state holds no row)."""

    files: ScoreFiles
    threshold: float

    def __float__(self) -> float:
        return float(self.threshold)

    def keep(self, data: ShardData) -> np.ndarray:
        return at_least(self.files.read(data.shard), self.threshold)
