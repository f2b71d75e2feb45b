"""dedup (exact by image sha256, or near by image-embedding cosine) and decontaminate (drop pool
images close to an evaluation set's images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from clipsift import ClipsiftError
from clipsift.filters.base import Context, Filter, ShardData, register, require
from clipsift.filters.subset import encode_uids
from clipsift.filters.vectors import SEARCH_BATCH, check_dim, check_source, ip_index, load_vectors, nearest
from clipsift.pipeline.pool import Pool

BY = ("sha256", "embedding")


@register
@dataclass
class Dedup(Filter):
    """Groups duplicates among the input rows and keeps one row per group: the first in pool order.

    by=sha256: rows with the same image sha256 (rows without one are never grouped).
    by=embedding: rows whose image embeddings have cosine >= threshold, grouped transitively
    (connected components), found with an exact faiss range search over the input rows.
    """

    name = "dedup"
    columns = ("sha256",)
    summary = "one row per group of duplicate images"
    by: str = "sha256"
    model_id: str | None = None
    threshold: float = 0.95

    def validate(self, where: str) -> None:
        require(self.by in BY, where, f"parameter 'by' must be one of {', '.join(BY)}, got {self.by!r}")
        require(self.by != "embedding" or self.model_id is not None, where, "by: embedding needs parameter 'model_id'")
        require(
            -1.0 <= self.threshold <= 1.0,
            where,
            f"parameter 'threshold' (cosine) must be in [-1, 1], got {self.threshold}",
        )

    def models(self) -> list[str]:
        return [self.model_id] if self.by == "embedding" else []

    def prepare(self, context: Context) -> Any:
        shards, positions, keys = [], [], []
        for data, rows in context.iter_data():
            selected = rows & (data.image_vectors(self.model_id)[1] if self.by == "embedding" else self._has_sha(data))
            shards.append(data.shard)
            positions.append(np.flatnonzero(selected))
            keys.append(self._keys(data, selected))
        owner = np.repeat(np.arange(len(shards)), [len(p) for p in positions])
        flat = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        keys_all = np.concatenate(keys) if keys else np.zeros(0)
        first = self._first_of_groups(keys_all)
        dropped = np.ones(len(flat), bool)
        dropped[first] = False
        return {shard: flat[dropped & (owner == i)] for i, shard in enumerate(shards)}

    def _has_sha(self, data: ShardData) -> np.ndarray:
        return data.column("sha256").is_valid().to_numpy(zero_copy_only=False)

    def _keys(self, data: ShardData, selected: np.ndarray) -> np.ndarray:
        if self.by == "embedding":
            return data.image_vectors(self.model_id)[0][selected]
        sha = pc.utf8_slice_codeunits(pc.utf8_lower(data.column("sha256").filter(selected)), 0, 32)
        try:
            return encode_uids(sha)  # the first 128 bits of the digest
        except ClipsiftError as err:
            raise ClipsiftError(
                f"{data.pool.metadata_path(data.shard)}: column sha256 holds a value that is not hex ({err})"
            ) from err

    def _first_of_groups(self, keys: np.ndarray) -> np.ndarray:
        """Indices (into the pool-ordered keys) of the first row of every group."""
        if self.by == "sha256":
            return np.unique(keys, return_index=True)[1]
        labels = components(len(keys), *similar_pairs(keys, self.threshold))
        return np.flatnonzero(labels == np.arange(len(keys)))

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        out = np.ones(len(rows), bool)
        out[state[data.shard]] = False
        return out


def similar_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i != j, with vectors[i] . vectors[j] >= threshold (exact range search)."""
    if len(vectors) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = ip_index(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps sims > radius
    sources, targets = [], []
    for start in range(0, len(vectors), SEARCH_BATCH):
        lims, sims, ids = index.range_search(np.ascontiguousarray(vectors[start : start + SEARCH_BATCH]), radius)
        query = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = (sims >= threshold) & (ids != query)
        sources.append(query[keep])
        targets.append(ids[keep])
    return np.concatenate(sources), np.concatenate(targets)


def components(n: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph: each node's label is the smallest node of its component."""
    labels = np.arange(n)
    while True:
        smaller = np.minimum(labels[sources], labels[targets])
        new = labels.copy()
        np.minimum.at(new, sources, smaller)
        np.minimum.at(new, targets, smaller)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


@register
@dataclass
class Decontaminate(Filter):
    """Drops pool rows whose image embedding has cosine >= threshold with any evaluation-set image.
    `eval` gives the evaluation images' embeddings from the same model (see filters/vectors.py);
    rows without an embedding are kept (nothing shows them to be close)."""

    name = "decontaminate"
    summary = "drop images close to an evaluation set's images"
    model_id: str
    eval: str
    threshold: float = 0.95
    eval_model_id: str | None = None

    def validate(self, where: str) -> None:
        require(
            -1.0 <= self.threshold <= 1.0,
            where,
            f"parameter 'threshold' (cosine) must be in [-1, 1], got {self.threshold}",
        )

    def models(self) -> list[str]:
        return [self.model_id]

    def check(self, pool: Pool, where: str) -> None:
        check_source(self.eval, self.eval_model_id or self.model_id, f"{where}: eval")

    def prepare(self, context: Context) -> Any:
        return load_vectors(self.eval, self.eval_model_id or self.model_id, "decontaminate eval")

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        vectors, valid = data.image_vectors(self.model_id)
        check_dim(state, vectors.shape[1], f"eval embeddings {self.eval}", "decontaminate")
        chosen = np.flatnonzero(rows & valid)
        out = np.ones(len(rows), bool)
        if len(chosen) and len(state):
            out[chosen] = nearest(ip_index(state), vectors[chosen])[0] < self.threshold
        return out
