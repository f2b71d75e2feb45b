"""dedup (exact by image sha256 or any metadata column, or near by image-embedding cosine) and decontaminate
(drop pool images close to an evaluation set's images).

Exact dedup is a hash-partitioned shuffle (pipeline/partition.py): each shard's keys go to partition files,
each partition finds the first row of every key in pool order, and each shard reads back its own dropped rows;
no process holds more than a shard or a partition. Near dedup by embedding is clustered (filters/near_dedup.py)
or, with `method: exact`, compares every pair of input rows in one process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsift import ClipsiftError
from clipsift.arrays import arrow_of, numpy_of
from clipsift.filters.base import Context, Filter, Inputs, ShardData, register, require
from clipsift.filters.on_device import DEVICES, pair_blocks, resolve
from clipsift.filters.subset import encode_uids
from clipsift.filters.vectors import check_dim, check_source, ip_index, load_vectors, nearest, vector_files
from clipsift.hashing import row_hashes
from clipsift.pipeline.partition import (
    DEFAULT_BUDGET_MB,
    Shuffle,
    hash_keys,
    keyed_rows,
    later_occurrences,
    map_group,
    partitions_for,
    position,
    read_batch,
    repeated,
    source_rows,
)
from clipsift.pipeline.pool import Pool

BY = ("sha256", "embedding", "url", "text")  # sha256, embedding, and the metadata columns that name a sample
METHODS = ("clustered", "exact")
BLOCK_ENTRIES = 1 << 22  # similarities computed at once by similar_pair_blocks (16 MiB of float32)
EDGE_CAP = 1 << 22  # pairs PairGroups holds before reducing them to one edge per grouped row (32 MiB as int32)
SELF_MARGIN = 1e-4  # a copy is joined to its first only when their similarity clears the threshold by this much
BLOCK_ROWS = 256  # rows a block has at most: its similarities stay in cache while they are scanned
KEY_ROW_BYTES = 48  # a partition row of a key dedup: the key (a 128-bit digest prefix, or a short string) + position


@register
@dataclass
class Dedup(Filter):
    """Groups duplicates among the input rows and keeps one row per group: the first in pool order.

    by=sha256: rows with the same image sha256 (its first 128 bits; rows without one are never grouped).
    by=url or by=text: rows with the same value of that metadata column (nulls are never grouped).
    by=embedding: rows whose image embeddings have cosine >= threshold, grouped transitively (connected
    components). method=clustered (default) compares rows within k-means clusters (SemDeDup-style, see
    filters/near_dedup.py); method=exact compares every pair of input rows in one process.
    """

    name = "dedup"
    summary = "one row per group of duplicate images"
    by: str = "sha256"
    model_id: str | None = None
    threshold: float = 0.95
    method: str = "clustered"
    k: int | None = None  # clusters (clustered); None: the square root of the input rows
    sample: int | None = None  # k-means sample rows (clustered); None: 40 per cluster
    spill: int = 3  # clusters each row is compared in (clustered): its nearest, and the next ones within reach
    device: str = "auto"  # by embedding: where the products run: auto (a GPU where the task sees one), cpu or cuda
    budget_mb: float = DEFAULT_BUDGET_MB  # partition (and cluster) data one process holds
    seed: int = 0

    def validate(self, where: str) -> None:
        require(self.by in BY, where, f"parameter 'by' must be one of {', '.join(BY)}, got {self.by!r}")
        require(self.by != "embedding" or self.model_id is not None, where, "by: embedding needs parameter 'model_id'")
        require(
            -1.0 <= self.threshold <= 1.0,
            where,
            f"parameter 'threshold' (cosine) must be in [-1, 1], got {self.threshold}",
        )
        require(self.method in METHODS, where, f"parameter 'method' must be one of {', '.join(METHODS)}")
        require(self.k is None or self.k > 0, where, f"parameter 'k' must be > 0, got {self.k}")
        require(self.sample is None or self.sample > 0, where, f"parameter 'sample' must be > 0, got {self.sample}")
        require(self.spill >= 1, where, f"parameter 'spill' must be >= 1, got {self.spill}")
        require(self.device in DEVICES, where, f"parameter 'device' must be one of {', '.join(DEVICES)}")
        require(self.budget_mb > 0, where, f"parameter 'budget_mb' must be > 0, got {self.budget_mb}")

    def models(self) -> list[str]:
        return [self.model_id] if self.by == "embedding" else []

    def prepare(self, context: Context) -> Any:
        if self.by == "embedding" and self.method == "exact":
            return self._prepare_all_pairs(context)
        if self.by == "embedding":
            from clipsift.filters.near_dedup import prepare_clustered

            return prepare_clustered(self, context)
        return self._prepare_keys(context)

    def _prepare_keys(self, context: Context) -> Any:
        shards = context.shards()
        rows = input_rows(context)
        shuffle = Shuffle(
            f"{context.workdir}.dedup",
            len(shards),
            partitions_for(rows, KEY_ROW_BYTES, self.budget_mb),
            len(shards),
            map_group(len(shards), rows / max(len(shards), 1), KEY_ROW_BYTES, self.budget_mb),
        )
        mapper = _KeyMap(context.pool, context.inputs, tuple(shards), self.by, shuffle.partitions)
        shuffle.run(
            mapper, later_occurrences, desc=f"dedup by {self.by}", workers=context.workers, address=context.address
        )
        return Dropped(shuffle, {shard: i for i, shard in enumerate(shards)})

    def _prepare_all_pairs(self, context: Context) -> Any:
        """The exact near-dedup: every input vector in this process, every pair compared (O(N^2 D))."""
        shards, positions, vectors = [], [], []
        for data, rows in context.iter_data():
            matrix, valid = data.image_vectors(self.model_id)
            selected = rows & valid
            shards.append(data.shard)
            positions.append(np.flatnonzero(selected))
            vectors.append(matrix[selected])
        owner = np.repeat(np.arange(len(shards)), [len(p) for p in positions])
        flat = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
        groups = PairGroups(len(matrix))
        for query, target in similar_pair_blocks(matrix, self.threshold, device=resolve(self.device)):
            groups.add(query, target)
        labels = groups.labels()
        dropped = labels != np.arange(len(matrix))
        return {shard: flat[dropped & (owner == i)] for i, shard in enumerate(shards)}

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        out = np.ones(len(rows), bool)
        out[state.dropped(data.shard) if isinstance(state, Dropped) else state[data.shard]] = False
        return out


def input_rows(context: Context) -> int:
    """How many rows the step sees (the pool's row count for a first step), from masks and parquet footers."""
    if context.inputs.whole_pool:
        return sum(context.pool.num_rows(shard) for shard in context.shards())
    return sum(int(context.inputs.mask(shard).sum()) for shard in context.shards())


@dataclass(frozen=True)
class Dropped:
    """A dedup's state: where each shard's dropped rows are (a shuffle's outputs, plus `extra` IPC files with a
    batch per shard). The state holds no row: each shard reads its own."""

    shuffle: Shuffle
    index: dict[str, int]  # shard -> its number (the shuffle's destination)
    extra: tuple[str, ...] = ()

    def dropped(self, shard: str) -> np.ndarray:
        number = self.index[shard]
        parts = [numpy_of(self.shuffle.read(number).column("pos"))]
        parts += [numpy_of(read_batch(path, number).column("pos")) for path in self.extra]
        return source_rows(np.concatenate(parts))


@dataclass(frozen=True)
class _KeyMap:
    """Map task of a key dedup: a shard's input rows that have a key, as (key..., pos), partitioned by key."""

    pool: Pool
    inputs: Inputs
    shards: tuple[str, ...]
    by: str
    partitions: int

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        data = ShardData(self.pool, self.shards[source])
        column = data.column(self.by)
        selected = self.inputs.mask(data.shard) & numpy_of(column.is_valid())
        chosen = column.filter(arrow_of(selected))
        if self.by == "sha256":
            pairs = sha256_keys(data, chosen)
            keys = pa.table({"hi": arrow_of(pairs["f0"]), "lo": arrow_of(pairs["f1"])})
        else:
            keys = pa.table({"key": _as_key(data, self.by, chosen)})
        hashes = hash_keys(keys.column(keys.num_columns - 1))
        return keyed_rows(keys, position(source, np.flatnonzero(selected)), hashes, self.partitions)


def sha256_keys(data: ShardData, column: pa.ChunkedArray) -> np.ndarray:
    """The first 128 bits of each sha256 (hex, any case) as `u8,u8` pairs."""
    sha = pc.utf8_slice_codeunits(pc.utf8_lower(column), 0, 32)
    try:
        return encode_uids(sha)
    except ClipsiftError as err:
        raise ClipsiftError(
            f"{data.pool.metadata_path(data.shard)}: column sha256 holds a value that is not hex ({err})"
        ) from err


def _as_key(data: ShardData, name: str, column: pa.ChunkedArray) -> pa.Array:
    try:
        return column.cast(pa.large_string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ClipsiftError(
            f"{data.pool.metadata_path(data.shard)}: dedup by {name}: its type {column.type} cannot be compared as "
            "text; pick a column of strings or numbers"
        ) from err


def similar_pair_blocks(
    vectors: np.ndarray, threshold: float, base: np.ndarray | None = None, device: str | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs (i, j) with vectors[i] . base[j] >= threshold, exact, block by block: feed them to `PairGroups`
    (n identical rows give n^2 pairs). Without `base`, the vectors against themselves, each pair of two rows once
    (i < j: half the products). Each block is a matrix product of at most BLOCK_ROWS rows and BLOCK_ENTRIES
    similarities (a block of 256 rows is scanned from cache: about 2x faster than one product per 6,000-row
    cluster), and only the few rows with a pair are looked at twice. `device`: a torch device to compute them on
    instead (filters/on_device.py)."""
    if device is not None:
        yield from pair_blocks(vectors, threshold, base, device)
        return
    own = base is None
    base_t = np.ascontiguousarray(vectors if own else base, np.float32).T
    step = max(1, min(BLOCK_ROWS, BLOCK_ENTRIES // max(base_t.shape[1], 1)))
    for start in range(0, len(vectors), step):
        first = start if own else 0  # against themselves: only the columns from the block's own rows on
        sims = np.ascontiguousarray(vectors[start : start + step], np.float32) @ base_t[:, first:]
        if own:
            sims[:, : len(sims)][_lower(len(sims))] = -np.inf  # a row with itself and with the rows before it
        yield _block_pairs(sims, threshold, start, first)


@functools.lru_cache(maxsize=4)
def _lower(n: int) -> np.ndarray:
    return np.tri(n, dtype=bool)


class PairGroups:
    """Connected components of pairs given block by block, holding about EDGE_CAP pairs at most: when more come,
    those held are replaced by one edge per grouped row (to its group's smallest row), which keeps the groups. So
    n identical rows (n^2 pairs: a placeholder image copied 60,000 times would be 3.6 billion) cost memory in n.
    Rows are held as int32 below 2^31 of them: a full cap is 32 MiB, and grouping it needs about 3x that."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dtype = _index_type(n)
        self.sources: list[np.ndarray] = [np.zeros(0, self.dtype)]
        self.targets: list[np.ndarray] = [np.zeros(0, self.dtype)]
        self.held = 0
        self.cap = EDGE_CAP

    def add(self, sources: np.ndarray, targets: np.ndarray) -> None:
        self.sources.append(np.asarray(sources).astype(self.dtype, copy=False))
        self.targets.append(np.asarray(targets).astype(self.dtype, copy=False))
        self.held += len(sources)
        if self.held > self.cap:
            labels = self.labels()
            rows = np.flatnonzero(labels != np.arange(self.n, dtype=self.dtype)).astype(self.dtype)
            self.sources, self.targets, self.held = [rows], [labels[rows]], len(rows)
            self.cap = max(EDGE_CAP, 2 * len(rows))  # a grouped row's edge stays: compress again only past twice them

    def labels(self) -> np.ndarray:
        """Each row's group: the smallest row of its component (the pairs held are let go while it is found)."""
        sources, self.sources = np.concatenate(self.sources), []
        targets, self.targets = np.concatenate(self.targets), []
        labels = components(self.n, sources, targets)
        self.sources, self.targets = [sources], [targets]
        return labels


def _index_type(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _block_pairs(sims: np.ndarray, threshold: float, start: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs >= threshold of a block of rows (from row `start`) against the base's columns from `first` on."""
    rows = np.flatnonzero(sims.max(axis=1, initial=-np.inf) >= threshold)  # few rows have a pair: those only
    query, target = np.nonzero(sims[rows] >= threshold)
    return rows[query] + start, target + first


def first_copies(vectors: np.ndarray, keys: np.ndarray | None = None, order: np.ndarray | None = None) -> np.ndarray:
    """The rows taken in `order` (default: all, as they are): for each, the position (in that order) of the first with
    bitwise the same vector and the same `keys` value (given in that order), itself when none comes before it.
    Exact: rows whose 64-bit hash repeats are compared byte for byte (two vectors of one hash are left apart).
    Memory: a few 8-byte values a row, and the repeated rows' bytes."""
    n = len(vectors)
    raw = np.ascontiguousarray(vectors).view(np.uint8).reshape(n, -1)
    if raw.shape[1] % 8:
        raw = np.concatenate([raw, np.zeros((n, 8 - raw.shape[1] % 8), np.uint8)], axis=1)
    at = np.arange(n) if order is None else np.asarray(order)
    key = None if keys is None else np.asarray(keys, np.int64)
    hashes = row_hashes(raw.view(np.uint64))
    hashes = hashes[at]
    if key is not None:
        hashes = row_hashes(key.view(np.uint64)[:, None], hashes)
    out = np.arange(len(at))
    candidates = np.flatnonzero(repeated(hashes))
    if not len(candidates):
        return out
    candidates = candidates[np.argsort(hashes[candidates], kind="stable")]  # equal hashes together, in order
    runs = hashes[candidates]
    starts = np.flatnonzero(np.diff(runs, prepend=~runs[:1]))
    firsts = np.repeat(candidates[starts], np.diff(np.append(starts, len(candidates))))
    later = firsts != candidates
    rows, firsts = candidates[later], firsts[later]
    same = (raw[at[rows]] == raw[at[firsts]]).all(axis=1)
    if key is not None:
        same &= key[rows] == key[firsts]
    out[rows[same]] = firsts[same]
    return out


def self_similar(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each vector's similarity with itself (float32, as the block products compute it) clears the
    threshold by a margin no rounding of those products can cross: only then are its copies surely pairs."""
    as32 = np.asarray(vectors, np.float32)
    return np.einsum("ij,ij->i", as32, as32) >= threshold + SELF_MARGIN


def components(n: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph: each node's label is the smallest node of its component (int32
    below 2^31 nodes)."""
    labels = np.arange(n, dtype=_index_type(n))
    sources, targets = sources.astype(labels.dtype, copy=False), targets.astype(labels.dtype, copy=False)
    while True:
        smaller = np.minimum(labels[sources], labels[targets])
        new = labels.copy()
        np.minimum.at(new, sources, smaller)
        np.minimum.at(new, targets, smaller)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def default_k(rows: int) -> int:
    """Clusters for `rows` input rows: about sqrt(rows) of about sqrt(rows) rows each, which balances the cost
    of assigning rows to centroids (k per row) against comparing them within clusters (rows/k per row)."""
    return max(1, math.isqrt(max(rows, 1)))


@register
@dataclass
class Decontaminate(Filter):
    """Drops pool rows whose image embedding has cosine >= threshold with any evaluation-set image.
    `eval` gives the evaluation images' embeddings from the same model (see filters/vectors.py);
    rows without an embedding are kept (nothing shows them to be close). The evaluation vectors are the
    state, loaded once and sent to the per-shard tasks once (Ray's object store); no task holds the pool."""

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

    def sources(self) -> list[str]:
        return [vector_files(self.eval, self.eval_model_id or self.model_id)]

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
