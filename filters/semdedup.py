"""semdedup: SemDeDup (Abbas et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic
deduplication", arXiv 2303.09540) on the image embeddings of a scored model.

The rule, as the paper's code applies it (facebookresearch/SemDeDup, semdedup.py): the input rows are clustered
by k-means of their embeddings, each row in exactly one cluster (its nearest centroid by inner product). Within a
cluster the rows are put in the `which_to_keep` order; a row is removed when some row before it in that order
(removed or not) has cosine >= 1 - eps with it (the paper's maximum over the upper triangle of the cluster's
similarity matrix; its code removes at > 1 - eps). So the "duplicate group" of a row is itself and its near
duplicates in its cluster; a row stays exactly when no row of its group comes before it. Groups are not merged
transitively: for a chain a ~ b ~ c (a and c not near duplicates) ordered a, c, b, only b goes, where `dedup
by: embedding` (connected components) keeps a alone; ordered a, b, c, both b and c go (c has b before it,
removed or not). Rows never meet rows of other clusters (a pair split by a cluster border stays), as in the paper.

`eps` must be > 0 (a `threshold` below 1): the stored embeddings are float16, L2-normalised before rounding, so
a vector's inner product with an identical copy falls below 1.0 for about half of them; a cosine of exactly 1 would
miss exact duplicates.

`which_to_keep` (the paper's parameter name; `keep` is the filter's method) orders each cluster by: `first`, pool
order; `central`, similarity to the cluster's centroid, highest first (the paper's "easy"); `farthest`, lowest
first (the paper's default, "hard"); ties by pool order.

Distribution: the machinery of the clustered near dedup (filters/near_dedup.py) with one cluster per row (its
`spill` 1): faiss k-means on a sample of the input embeddings read by per-shard tasks, a cluster the sample says
would outgrow `budget_mb` split by k-means of its own rows (the final centroids are the clusters), a map task per
shard writing rows to their cluster's partition file, and a reduce task per partition applying the rule above
cluster by cluster and sending each removed row to its shard. The centroids are kept in the step's work folder
(`<step>.dedup/plan.npz`), so a re-run after a kill reuses them and the finished passes.

Memory per process: the planning process holds the k-means sample (`sample_rate` of the input rows, default 40
rows per cluster, float32); a map task one shard and the centroids; a reduce task one partition (about
`budget_mb`), its clusters' vectors as float32 and at most BLOCK_ENTRIES similarities; `keep` its shard's removed
rows. No process holds per-row state of the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from clipsift.arrays import arrow_of, numpy_of
from clipsift.filters.base import Context, Filter, ShardData, register, require
from clipsift.filters.dedup import BLOCK_ENTRIES, Dedup, Dropped, input_rows
from clipsift.filters.near_dedup import ClusterPlan, cluster_passes, partition_clusters
from clipsift.pipeline.partition import DEFAULT_BUDGET_MB

KEEPS = ("first", "central", "farthest")
FLOAT16_NOTE = (  # why a cosine of 1 (eps 0) is refused
    "embeddings are stored as float16, so a vector's cosine with an exact copy of itself is often a little below 1; "
    "for exact duplicates give a small eps such as 0.001 (identical image files: `dedup by: sha256`)"
)


@register
@dataclass
class SemDedup(Filter):
    """SemDeDup (module docstring): within k-means clusters of the image embeddings of `model_id`, a row is removed
    when a row before it in the `which_to_keep` order has cosine >= 1 - eps (or >= `threshold`: give one of the two).
    k: clusters (default the square root of the input rows); sample_rate: the share of the input rows k-means
    is fitted on (default 40 rows per cluster); seed: of the sample and of k-means. Rows without an embedding stay."""

    name = "semdedup"
    summary = "SemDeDup: drop near-duplicate images within k-means clusters"
    model_id: str
    eps: float | None = None
    threshold: float | None = None
    which_to_keep: str = "first"  # not `keep`: that is Filter's method
    k: int | None = None
    sample_rate: float | None = None
    seed: int = 0
    budget_mb: float = DEFAULT_BUDGET_MB

    def validate(self, where: str) -> None:
        require(
            (self.eps is None) != (self.threshold is None),
            where,
            "give exactly one of 'eps' (rows at cosine >= 1 - eps are duplicates) and 'threshold' (a cosine)",
        )
        require(
            self.eps is None or self.eps > 0.0, where, f"parameter 'eps' must be > 0, got {self.eps}: {FLOAT16_NOTE}"
        )
        require(self.eps is None or self.eps <= 2.0, where, f"parameter 'eps' must be at most 2, got {self.eps}")
        require(
            self.threshold is None or self.threshold < 1.0,
            where,
            f"parameter 'threshold' (cosine) must be below 1, got {self.threshold}: {FLOAT16_NOTE}",
        )
        require(
            self.threshold is None or self.threshold >= -1.0,
            where,
            f"parameter 'threshold' (cosine) must be at least -1, got {self.threshold}",
        )
        require(
            self.which_to_keep in KEEPS,
            where,
            f"parameter 'which_to_keep' must be one of {', '.join(KEEPS)}, got {self.which_to_keep!r}",
        )
        require(self.k is None or self.k > 0, where, f"parameter 'k' must be > 0, got {self.k}")
        require(
            self.sample_rate is None or 0.0 < self.sample_rate <= 1.0,
            where,
            f"parameter 'sample_rate' must be in (0, 1], got {self.sample_rate}",
        )
        require(self.budget_mb > 0, where, f"parameter 'budget_mb' must be > 0, got {self.budget_mb}")

    @property
    def cosine(self) -> float:
        """The similarity at and above which two rows are duplicates."""
        return 1.0 - self.eps if self.eps is not None else float(self.threshold)

    def models(self) -> list[str]:
        return [self.model_id]

    def prepare(self, context: Context) -> Any:
        """Where each shard's removed rows are (a `Dropped`), or None when no input row has an embedding."""
        sample = None
        if self.sample_rate is not None:
            sample = max(1, math.ceil(self.sample_rate * input_rows(context)))
        clustered = Dedup(  # the near dedup's settings, one cluster per row (spill 1)
            by="embedding",
            model_id=self.model_id,
            threshold=self.cosine,
            k=self.k,
            sample=sample,
            spill=1,
            device="cpu",  # its own reduce runs on CPUs; its tasks ask for no GPU
            budget_mb=self.budget_mb,
            seed=self.seed,
        )
        shards = context.shards()
        passes = cluster_passes(
            clustered,
            context,
            lambda plan: _SemDedupReduce(plan, self.cosine, self.which_to_keep),
            len(shards),
            "semdedup",
        )
        return None if passes is None else Dropped(passes[0], {shard: i for i, shard in enumerate(shards)})

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        out = np.ones(len(rows), bool)
        if state is not None:
            out[state.dropped(data.shard)] = False
        return out


@dataclass(frozen=True)
class _SemDedupReduce:
    """Reduce task: each cluster of the partition put in the `which_to_keep` order; sends (pos) of its removed rows
    to their shard."""

    plan: ClusterPlan
    threshold: float
    keep: str

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        pos = numpy_of(table.column("pos")) if table.num_rows else np.zeros(0, np.int64)
        removed = [np.zeros(0, np.int64)]
        with threadpool_limits(1, user_api="blas"):  # BLAS threads cost more than they give on products this small
            for cluster, rows, vectors in partition_clusters(table):
                order = keep_order(vectors, self.plan.centroids[cluster], pos[rows], self.keep)
                later = has_earlier_duplicate(vectors[order], self.threshold)
                removed.append(pos[rows[order[later]]])
        dropped = np.concatenate(removed)
        return pa.table({"pos": arrow_of(dropped.astype(np.int64))}), dropped >> np.int64(32)


def keep_order(vectors: np.ndarray, centroid: np.ndarray, pos: np.ndarray, keep: str) -> np.ndarray:
    """The order in which a cluster's rows claim their duplicates (the first of a group stays)."""
    if keep == "first":
        return np.argsort(pos, kind="stable")
    similarity = vectors @ centroid.astype(np.float32)
    return np.lexsort((pos, -similarity if keep == "central" else similarity))


def has_earlier_duplicate(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each row has cosine >= threshold with a row before it: blocks of rows, each against the rows up to
    its end (at most BLOCK_ENTRIES similarities at once; no list of pairs, which a cluster of copies makes huge)."""
    out = np.zeros(len(vectors), bool)
    step = max(1, BLOCK_ENTRIES // max(len(vectors), 1))
    for start in range(0, len(vectors), step):
        end = min(len(vectors), start + step)
        sims = vectors[start:end] @ vectors[:end].T
        square = sims[:, start:end]
        square[np.triu_indices(end - start)] = -np.inf  # a row and the rows after it do not count
        out[start:end] = (sims >= threshold).any(axis=1)
    return out
