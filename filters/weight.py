"""weight: the last step of a recipe may give each kept row a number of copies (a weighted subset).

A subset may list a uid several times (DataComp's .npy allows it; `clipsift reshard` writes the
sample that many times). A `weight` step, allowed only as the last top-level step of a recipe,
gives each of its input rows a count of copies (0: dropped); the recipe runner saves the counts
per shard and the subset lists each uid that many times, sorted as every subset is. subset.json
then records `num_uids` (entries of the .npy, copies included), `num_unique_uids` (rows with at
least one copy) and `copies` (how many rows got 1, 2, ... copies).

Modes (`by`):
- `score_quantile`: rows in the top bins of a model's CLIP score get more copies. `bins` are
  fractions of the step's input, best first, `counts` the copies of each bin plus one for the
  rest: bins [0.1, 0.2], counts [3, 2, 1] gives the top 10% three copies, the next 20% two, every
  other scored row one. Bin edges are clip_score's thresholds for `fraction` 0.1 and 0.3 (the
  cumulative fractions; DataComp's exact rank threshold, filters/quantile.py), with its `scores`
  and `count_absent`: a row goes to the first bin whose threshold its score reaches, so rows tied
  at an edge all go to the better bin. Rows without a score get 0 copies, as every score filter
  drops them. Memory: clip_score's threshold pass, once per bin.
- `balance`: MetaCLIP's balancing (filters/balance.py) with replacement. With c the count of a
  row's rarest matched entry and r = t / c, the row gets floor(r) copies and one more with
  probability r - floor(r) (the same hash draw as balance), at most `max_copies`: expected copies
  min(max_copies, t / c). Rare entries are upsampled towards t rows each, frequent ones cut to
  about t, and `max_copies: 1` is the balance filter itself, row for row. Rows that match no entry
  get 0 copies (`unmatched: drop`) or 1 (`keep`). Memory: as balance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from clipsift.filters.balance import (
    BalanceParams,
    expected_copies,
    rarest_counts,
    sampled_copies,
    uniforms,
)
from clipsift.filters.base import Context, Filter, ShardData, register, require
from clipsift.filters.clip import ScoreSource, shard_scores
from clipsift.filters.scores import TopFraction, at_least
from clipsift.pipeline.pool import Pool

BY = ("score_quantile", "balance")
PARAMS = {  # the parameters only one mode reads
    "score_quantile": ("model_id", "bins", "counts", "scores", "count_absent"),
    "balance": ("entries", "t", "match", "unmatched", "seed", "suite_data", "max_copies"),
}


class Weighting(Filter):
    """A filter that gives rows a number of copies; the recipe runner allows it only as the last top-level step."""

    def copies(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        """Copies of each of the shard's rows (int64; only `rows` matter, the rest may be anything)."""
        raise NotImplementedError

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return rows & (self.copies(state, data, rows) > 0)


@dataclass(frozen=True)
class _Edge(TopFraction):
    """A bin edge: clip_score's threshold for `fraction`."""

    fraction: float
    threshold: float | None = None


@register
@dataclass
class Weight(ScoreSource, BalanceParams, Weighting):
    """Copies per row by `by`: score_quantile (bins of a model's CLIP score) or balance (MetaCLIP with replacement);
    see the module doc. Only as the last top-level step of a recipe."""

    name = "weight"
    columns = ("uid",)
    summary = "copies per row (a weighted subset): by CLIP-score bins or MetaCLIP balancing"
    by: str | None = None
    model_id: str | None = None
    bins: list[float] | None = None
    counts: list[int] | None = None
    scores: str = "auto"
    count_absent: bool = True
    max_copies: int = 4

    def validate(self, where: str) -> None:
        require(self.by in BY, where, f"parameter 'by' must be one of {', '.join(BY)}, got {self.by!r}")
        (other,) = [mode for mode in BY if mode != self.by]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        stray = [param for param in PARAMS[other] if getattr(self, param) != defaults[param]]
        require(not stray, where, f"parameter {', '.join(stray)} is for by: {other}, not by: {self.by}")
        if self.by == "balance":
            self.validate_balance(where)
            require(self.max_copies >= 1, where, f"parameter 'max_copies' must be >= 1, got {self.max_copies}")
            return
        for param in ("model_id", "bins", "counts"):
            require(getattr(self, param) is not None, where, f"by: score_quantile needs parameter {param!r}")
        require(
            len(self.counts) == len(self.bins) + 1,
            where,
            f"parameter 'counts' needs one more value than 'bins' (the last for the rest), got {len(self.counts)} "
            f"counts for {len(self.bins)} bins",
        )
        require(all(b > 0 for b in self.bins), where, f"every bin must be a fraction > 0, got {self.bins}")
        require(sum(self.bins) <= 1.0 + 1e-9, where, f"the bins must add up to at most 1, got {sum(self.bins)}")
        require(all(c >= 0 for c in self.counts), where, f"counts must be >= 0, got {self.counts}")

    def models(self) -> list[str]:
        return ScoreSource.models(self) if self.by == "score_quantile" else []

    def check(self, pool: Pool, where: str) -> None:
        if self.by == "balance":
            BalanceParams.check(self, pool, where)
        else:
            self.resolve(pool, where)

    def prepare(self, context: Context) -> Any:
        if self.by == "balance":
            state = self.entry_counts(context)
            expected = expected_copies(state, context.shards(), self.t, self.max_copies, self.unmatched)
            return replace(state, expected=expected)
        edges = np.minimum(np.cumsum(self.bins), 1.0)  # each bin's lower edge, at the cumulative fraction
        return [self.top_cutoff(_Edge(float(edge)), context, self.count_absent) for edge in edges]

    def copies(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        if self.by == "balance":
            rarest = rarest_counts(state, data.shard, len(rows))
            return sampled_copies(
                rarest, uniforms(data.column("uid"), self.seed), self.t, self.max_copies, self.unmatched
            )
        scores = shard_scores(data, self.model_id, self.column(data.pool))
        out = np.where(np.isnan(scores), 0, self.counts[-1]).astype(np.int64)  # no score: dropped, as score filters do
        for threshold, count in reversed(list(zip(state, self.counts))):  # the best bin last: it wins ties
            out[at_least(scores, threshold)] = count
        return out
