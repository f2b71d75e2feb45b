"""Filters on the CLIP score (cosine of image and text embeddings) of a scored model: clip_score, laion2b."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsift.filters.base import Context, Filter, RecipeError, ShardData, register, require
from clipsift.filters.metadata import language_ok
from clipsift.filters.quantile import top_fraction_threshold


@register
@dataclass
class ClipScore(Filter):
    """Keep rows whose clip_score under `model_id` is >= `threshold`, or the top `fraction` of the input.

    fraction has DataComp's semantics: threshold = the score at rank int(N * fraction) of the input
    sorted descending, N counting every input row (rows without a score rank last); ties at the
    threshold are all kept. The threshold is found in a first pass that reads only the score column
    (exact, in bounded memory: filters/quantile.py), then rows are filtered shard by shard.
    """

    name = "clip_score"
    summary = "CLIP score above a threshold or in the top fraction"
    model_id: str
    threshold: float | None = None
    fraction: float | None = None

    def validate(self, where: str) -> None:
        if (self.threshold is None) == (self.fraction is None):
            raise RecipeError(f"{where}: give exactly one of 'threshold' and 'fraction'")
        if self.fraction is not None:
            require(0.0 <= self.fraction <= 1.0, where, f"parameter 'fraction' must be in [0, 1], got {self.fraction}")

    def models(self) -> list[str]:
        return [self.model_id]

    def prepare(self, context: Context) -> Any:
        if self.fraction is None:
            return self.threshold
        num_rows = sum(int(rows.sum()) for _, rows in context.iter_data())
        if num_rows == 0:
            return float("inf")
        batches = lambda: (data.scores(self.model_id)[rows] for data, rows in context.iter_data())  # noqa: E731
        return top_fraction_threshold(batches, num_rows, self.fraction)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return at_least(data.scores(self.model_id), state)


@register
@dataclass
class Laion2b(Filter):
    """LAION-2B's rule as DataComp reproduced it: English caption and ViT-B/32 CLIP score >= 0.28.
    LAION used CLD3 for the language; clipsift uses fastText lid.176 (filters/text.py)."""

    name = "laion2b"
    columns = ("text",)
    summary = "English and B/32 CLIP score >= 0.28"
    model_id: str = "ViT-B-32__openai"
    threshold: float = 0.28
    language: str | None = "en"

    def models(self) -> list[str]:
        return [self.model_id]

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        scored = rows & at_least(data.scores(self.model_id), self.threshold)
        return language_ok(data, self.language, scored)


def at_least(scores: np.ndarray, threshold: float) -> np.ndarray:
    """score >= threshold at the scores' float32 precision (a stored 0.28 passes 0.28); NaN never passes."""
    with np.errstate(invalid="ignore"):
        return scores >= np.float32(threshold)
