"""image_cluster: DataComp's image-based filter, on any pool and any reference set.

k-means (faiss; on GPUs when faiss sees them) on the input rows' image embeddings gives K
centroids, saved to a .npy file and reused when that file already exists (so DataComp's published
centroids, or those of an earlier run, can be given). Every target embedding (a reference set
scored with the same model) is assigned to its nearest centroid by inner product; a pool row is
kept when its own nearest centroid received at least one target. The pool assignment runs shard
by shard (Ray tasks, like every per-shard step), the centroids sent to them once; the k-means sample
(`subsample` of the input rows, at most `max_points_per_centroid` x k of them: faiss's own default
cap, 256) is read by per-shard tasks too, and only the sample and the targets are ever held in one
process: O(k x 256 x D) whatever the pool's size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsift.files import open_fs, write_atomic
from clipsift.filters.base import Artifact, Clusters, Context, Filter, RecipeError, ShardData, register, require
from clipsift.filters.dedup import input_rows
from clipsift.filters.vectors import (
    check_dim,
    check_source,
    fit_kmeans,
    ip_index,
    load_vectors,
    nearest,
    sample_vectors,
    vector_files,
)
from clipsift.pipeline.pool import Pool


@register
@dataclass
class ImageCluster(Filter):
    name = "image_cluster"
    summary = "image embedding falls in a k-means cluster that holds a target (reference) image"
    writes = (Artifact("centroids", "centroids", "centroids.npy"),)
    model_id: str
    targets: str
    k: int | None = None
    iterations: int = 20
    seed: int = 0
    subsample: float = 1.0
    max_points_per_centroid: int | None = 256  # None: every (subsampled) input row, as DataComp at small/medium
    spherical: bool = False
    centroids: str | None = None  # .npy: read when it exists, else fitted and written there
    targets_model_id: str | None = None

    def validate(self, where: str) -> None:
        require(self.k is None or self.k > 0, where, f"parameter 'k' must be > 0, got {self.k}")
        require(self.iterations > 0, where, f"parameter 'iterations' must be > 0, got {self.iterations}")
        require(0.0 < self.subsample <= 1.0, where, f"parameter 'subsample' must be in (0, 1], got {self.subsample}")
        cap = self.max_points_per_centroid
        require(cap is None or cap > 0, where, f"parameter 'max_points_per_centroid' must be > 0, got {cap}")

    def models(self) -> list[str]:
        return [self.model_id]

    def check(self, pool: Pool, where: str) -> None:
        check_source(self.targets, self.targets_model_id or self.model_id, f"{where}: targets")
        if not self._centroids_exist():
            require(
                self.k is not None,
                where,
                f"no centroids file {self.centroids}, so parameter 'k' is needed to fit them",
            )

    def sources(self) -> list[str]:
        """The targets (the centroids file is a `writes` file: subset.json records its sha256)."""
        return [vector_files(self.targets, self.targets_model_id or self.model_id)]

    def _centroids_exist(self) -> bool:
        if self.centroids is None:
            return False
        fs, path = open_fs(self.centroids)
        return fs.exists(path)

    def make_artifacts(self, context: Context) -> None:
        if not self._centroids_exist():
            self._fit(context)

    def prepare(self, context: Context) -> Any:
        where = f"image_cluster centroids {self.centroids}"
        centroids = read_centroids(self.centroids) if self._centroids_exist() else self._fit(context)
        if self.k is not None and len(centroids) != self.k:
            raise RecipeError(
                f"{where}: the file holds {len(centroids)} centroids but k is {self.k}; "
                "delete the file to fit new ones, or name another file"
            )
        targets = load_vectors(self.targets, self.targets_model_id or self.model_id, "image_cluster targets")
        check_dim(targets, centroids.shape[1], f"targets {self.targets}", where)
        hit = np.zeros(len(centroids), bool)
        hit[nearest(ip_index(centroids), targets)[1]] = True
        return centroids, hit

    def sample_rate(self, input_rows: int) -> float:
        """The share of input rows the k-means fit reads: `subsample`, lowered to hold at most
        max_points_per_centroid x k rows (the sample then has that size in expectation)."""
        if self.max_points_per_centroid is None or input_rows == 0:
            return self.subsample
        return min(self.subsample, self.max_points_per_centroid * self.k / input_rows)

    def _fit(self, context: Context) -> np.ndarray:
        rate = self.sample_rate(input_rows(context))
        train = sample_vectors(context, self.model_id, rate, self.seed, "image_cluster: k-means sample")
        if len(train) < self.k:
            raise RecipeError(
                f"image_cluster: {len(train)} embeddings to cluster but k is {self.k}; lower k or subsample less"
            )
        centroids = fit_kmeans(train, self.k, self.iterations, self.seed, self.spherical)
        save_centroids(self.centroids, centroids)
        return centroids

    def clusters(self, state: Any) -> Clusters | None:
        centroids, hit = state
        return Clusters(self.model_id, centroids, hit)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        centroids, hit = state
        vectors, valid = data.image_vectors(self.model_id)
        check_dim(centroids, vectors.shape[1], f"centroids {self.centroids}", "image_cluster")
        chosen = np.flatnonzero(rows & valid)
        out = np.zeros(len(rows), bool)
        out[chosen] = hit[nearest(ip_index(centroids), vectors[chosen])[1]]
        return out


def read_centroids(url: str) -> np.ndarray:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as handle:
        array = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    if array.ndim != 2:
        raise RecipeError(f"centroids file {url} holds shape {array.shape}, expected [K, D]")
    return np.ascontiguousarray(array, np.float32)


def save_centroids(url: str, centroids: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    fs, path = open_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    write_atomic(fs, path, lambda handle: handle.write(buffer.getvalue()))
