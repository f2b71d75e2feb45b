"""Seeded sample shuffling for open_clip_train's webdataset pipeline.

open_clip_train shuffles shards with a seeded generator, but samples with webdataset's `shuffle`
stage, whose generator, when none is given, is seeded from the clock and the process id: two runs
with the same seed then see the samples in different orders and end at different weights (xs,
seed 0: final loss 3.88 in one run, 4.02 in the next). While open_clip_train builds its pipeline,
`seeded_sample_shuffle` puts a stage in its place whose generator is seeded from the DataLoader
worker's seed (which the loader draws from torch's generator, seeded by open_clip_train from
--seed) and the number of passes over the data, so the seed fixes the order. The buffer sizes and
the shuffle itself are webdataset's.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any


class SeededShuffle:
    """webdataset's `shuffle(bufsize, initial)` stage with a generator seeded per data worker and pass."""

    def __init__(self, bufsize: int = 1000, initial: int = 100, rng: random.Random | None = None, handler: Any = None):
        self.bufsize, self.initial, self.rng, self.handler = bufsize, initial, rng, handler
        self.passes = 0  # counted in each worker's own copy of the pipeline

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        from open_clip_train.data import pytorch_worker_seed
        from webdataset.filters import _shuffle

        self.passes += 1
        rng = self.rng or random.Random(pytorch_worker_seed(self.passes))
        return _shuffle(iter(source), self.bufsize, self.initial, rng, self.handler)


@contextlib.contextmanager
def seeded_sample_shuffle() -> Iterator[None]:
    """While open_clip_train builds its data pipeline: `webdataset.shuffle` makes `SeededShuffle` stages."""
    import webdataset

    original = webdataset.shuffle
    webdataset.shuffle = SeededShuffle
    try:
        yield
    finally:
        webdataset.shuffle = original
