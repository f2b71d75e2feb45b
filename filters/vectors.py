"""Embedding vectors from outside the filtered pool (reference sets, evaluation sets, centroids) and
faiss inner-product search (on every GPU when faiss sees one, else on the CPU).

A vector source is any of:
- a pool directory scored with the model: POOL/embeddings/<model_id>/*.parquet, column image_emb;
- an embeddings folder itself (a directory of such parquet files);
- one parquet file with an `image_emb` column (fixed-size or plain list of floats);
- a .npy file holding a [rows, D] float array.
Vectors are L2-normalised on load, so inner product is cosine similarity.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa

from clipsift.files import open_fs, read_parquet
from clipsift.filters.base import Context, Inputs, RecipeError, ShardData
from clipsift.pipeline.parallel import map_shards
from clipsift.pipeline.pool import Pool, embedding_matrix

SEARCH_BATCH = 8192


def check_source(source: str, model_id: str, where: str) -> None:
    """Fail early when `source` cannot give vectors of `model_id`."""
    fs, path = open_fs(source)
    if not fs.exists(path):
        raise RecipeError(
            f"{where}: {source} does not exist (expected a scored pool, an embeddings folder, a .parquet or a .npy)"
        )
    if fs.isdir(path) and fs.exists(f"{path}/pool.json") and not fs.isdir(f"{path}/embeddings/{model_id}"):
        raise RecipeError(
            f"{where}: {source} has no embeddings folder {path}/embeddings/{model_id}; "
            f"score it first: clipsift score {source} (with the model {model_id}), or, if it was scored with "
            f"--out DIR, give DIR/{model_id} as the source"
        )
    if fs.isdir(path) and not fs.exists(f"{path}/pool.json") and not fs.glob(f"{path}/*.parquet"):
        raise RecipeError(f"{where}: {source} is a folder with neither pool.json nor embeddings parquet files")


def vector_files(source: str, model_id: str) -> str:
    """What `load_vectors(source, model_id)` reads (a filter's `sources`): a pool's embeddings folder of the model,
    else `source` itself."""
    fs, path = open_fs(source)
    if fs.isdir(path) and fs.exists(f"{path}/pool.json"):
        return f"{Pool(source).embeddings_home}/{model_id}"
    return source


def load_vectors(source: str, model_id: str, where: str) -> np.ndarray:
    """All vectors of `source` as float32 [rows, D], L2-normalised (rows without a vector dropped)."""
    fs, path = open_fs(source)
    if fs.isdir(path):
        if fs.exists(f"{path}/pool.json"):
            pool = Pool(source)
            tables = [
                pool.embeddings(model_id, s, ["image_emb"])
                for s in pool.shard_ids()
                if pool.has_embeddings(model_id, s)
            ]
        else:
            tables = [read_parquet(fs, p, ["image_emb"]) for p in sorted(fs.glob(f"{path}/*.parquet"))]
        parts = [_table_vectors(t, where) for t in tables]
        if not parts:
            raise RecipeError(f"{where}: {source} holds no embeddings")
        vectors = np.concatenate(parts)
    elif path.endswith(".npy"):
        with fs.open(path, "rb") as handle:
            vectors = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    elif path.endswith(".parquet"):
        vectors = _table_vectors(read_parquet(fs, path), where)
    else:
        raise RecipeError(f"{where}: {source}: unknown vector file type (use a .npy, a .parquet or a scored pool)")
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise RecipeError(
            f"{where}: {source} holds {vectors.dtype} of shape {vectors.shape}, expected a [rows, D] float array"
        )
    return normalise(vectors.astype(np.float32))


def _table_vectors(table: pa.Table, where: str) -> np.ndarray:
    if "image_emb" not in table.column_names:
        raise RecipeError(
            f"{where}: a vector parquet needs an `image_emb` column; it has {', '.join(table.column_names)}"
        )
    column = table.column("image_emb")
    if pa.types.is_fixed_size_list(column.type):
        matrix, valid = embedding_matrix(table, "image_emb")
        return matrix[valid]
    rows = [v for v in column.to_pylist() if v is not None]
    return np.asarray(rows, np.float32).reshape(len(rows), -1)


def normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1), dtype=np.float32)


def ip_index(vectors: np.ndarray):
    """An exact inner-product faiss index over `vectors`, on all GPUs when there are any."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(vectors, np.float32))
    return index


def nearest(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, id) of each query's nearest vector by inner product, searched in batches."""
    sims, ids = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), SEARCH_BATCH):
        batch = np.ascontiguousarray(queries[start : start + SEARCH_BATCH], np.float32)
        s, i = index.search(batch, 1)
        sims[start : start + len(batch)], ids[start : start + len(batch)] = s[:, 0], i[:, 0]
    return sims, ids


def check_dim(vectors: np.ndarray, dim: int, what: str, where: str) -> None:
    if vectors.shape[1] != dim:
        raise RecipeError(
            f"{where}: {what} have dimension {vectors.shape[1]}, the pool's embeddings (and centroids) {dim}; "
            "all must come from the same model"
        )


def sample_vectors(context: Context, model_id: str, rate: float, seed: int, desc: str) -> np.ndarray:
    """The image embeddings of a step's input rows, each row kept with probability `rate` (seeded per shard),
    read shard by shard in tasks: the driver holds the sample, never the pool."""
    task = functools.partial(_sample_shard, context.pool, context.inputs, model_id, rate, seed)
    parts = map_shards(  # reading parquet and sampling with NumPy: safe side by side on threads
        task,
        list(enumerate(context.shards())),
        desc=desc,
        workers=context.workers,
        address=context.address,
        threads=True,
    )
    if not parts:
        return np.zeros((0, 1), np.float32)
    out = np.empty((sum(len(part) for part in parts), parts[0].shape[1]), np.float32)
    at = 0
    for index, part in enumerate(parts):  # each part let go once copied: about the sample and one part at once,
        out[at : at + len(part)] = part  # where np.concatenate would hold the parts and the sample
        at += len(part)
        parts[index] = None
    return out


def _sample_shard(pool: Pool, inputs: Inputs, model_id: str, rate: float, seed: int, item: tuple[int, str]):
    index, shard = item
    vectors, valid = ShardData(pool, shard).image_vectors(model_id)
    chosen = inputs.mask(shard) & valid
    if rate < 1.0:
        chosen &= np.random.default_rng([seed, index]).random(len(chosen)) < rate
    return vectors[chosen]


def fit_kmeans(
    train: np.ndarray, k: int, iterations: int, seed: int, spherical: bool, min_points_per_centroid: int = 39
) -> np.ndarray:
    """k-means centroids (float32 [k, D]) of `train` by faiss, on the GPUs when faiss sees any; every point used
    (faiss warns below `min_points_per_centroid` points per centroid)."""
    import faiss

    kmeans = faiss.Kmeans(
        train.shape[1],
        k,
        niter=iterations,
        seed=seed,
        spherical=spherical,
        gpu=faiss.get_num_gpus() > 0,
        max_points_per_centroid=1 << 30,
        min_points_per_centroid=min_points_per_centroid,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(train, np.float32))
    return np.asarray(kmeans.centroids, np.float32)
