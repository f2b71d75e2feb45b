"""Near-duplicate dedup at scale, SemDeDup-style: `dedup: {by: embedding}` with method clustered (the default).

1. plan (this process): k-means (faiss, on GPUs when it sees any) on a sample of the input embeddings read by
   per-shard tasks; a cluster the sample says would outgrow `budget_mb` is split by k-means of its own sample
   rows (up to three rounds); clusters are packed into partitions of about `budget_mb`. Kept in the step's
   work folder, so a re-run uses the same centroids.
2. map, a task per shard (the centroids sent once): each input row goes to its nearest centroid (its primary
   cluster) and to each of its next `spill - 1` nearest centroids whose similarity is within reach (below), as a
   secondary member; rows are written to their clusters' partitions (pipeline/partition.py).
3. reduce, a task per partition: within each cluster, every primary member is compared with every member
   (exact cosine, matrix products: the primaries with each other, each pair once, then the other members with
   them; only the few rows that have a pair are searched again) and the pairs >= threshold are grouped
   transitively (one connected-components pass over the partition: no pair joins two clusters, so no group
   spans two). A group whose rows all live only here is final: all but its first row (pool order) are dropped.
   A group holding a row that is also a member of another cluster goes to this process as (row, group) pairs.
4. merge, as rounds of shuffles (pipeline/components.py): the pairs are grouped again (connected components,
   each task holding one partition of them), and all but the first row of each group are dropped.

Copies (rows with bitwise the same vector, as every copy of one image file has) are collapsed before the
products, exactly (a copy is joined to its first row only when their similarity surely clears the threshold):
the map sends a row whose vector came earlier in its own shard as dropped for good (to a partition by its
position), so a placeholder image copied millions of times sends its cluster one row per shard; the reduce
compares one row per distinct vector of a cluster and joins the others to it.

`semdedup` (filters/semdedup.py) runs steps 1-3 with spill 1 (`cluster_passes`) and a reduce of its own.

The map's products with the centroids and the reduce's products within clusters run with torch on a GPU where a
task sees one (`dedup.device`, filters/on_device.py), with NumPy on the CPU otherwise.

Exactness. A pair (x, y) is found when y's primary cluster is x's primary cluster or one of x's secondary
clusters (or the other way round). For unit vectors with cosine >= t, |x.c - y.c| <= |x - y| <= d =
sqrt(2 - 2t) for every unit centroid c, so x's similarity to y's nearest centroid is at least x's best minus
2d: a centroid further than 2d below a row's best can hold none of its partners, and `spill` bounds how many
of the nearer ones are tried. With spill >= k the result is the exact all-pairs result; with the default
(spill 3) a pair is missed only when neither row's three nearest centroids include the other's nearest, which
happens where several clusters meet (docs/filters.md gives measured rates). A missed pair can only make the
method keep rows the exact search drops, never drop one it keeps: a missed link splits a group, and each part
keeps its first row.
"""

from __future__ import annotations

import heapq
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from clipsift.arrays import arrow_of, numpy_of
from clipsift.files import open_fs, write_atomic
from clipsift.filters.base import Context, Inputs, ShardData
from clipsift.filters.dedup import (
    Dedup,
    Dropped,
    PairGroups,
    default_k,
    first_copies,
    input_rows,
    self_similar,
    similar_pair_blocks,
)
from clipsift.filters.on_device import gpu_share, resolve, top_centroids
from clipsift.filters.vectors import fit_kmeans, normalise, sample_vectors
from clipsift.hashing import splitmix64
from clipsift.pipeline.components import not_smallest
from clipsift.pipeline.parallel import local_threads, stop_point
from clipsift.pipeline.partition import ReduceFn, Shuffle, map_group, partitions_for, position, read_batch
from clipsift.pipeline.pool import Pool

ITERATIONS = 10  # k-means iterations (the clusters only need to keep near neighbours together)
SPLIT_ROUNDS = 3  # rounds of splitting clusters the sample says are over the budget
SAMPLE_PER_CLUSTER = 40  # default sample rows per cluster (faiss asks for at least 39)
NORM_SLACK = 2e-3  # float16 embeddings are unit length to about 1e-3
CHUNK_ROWS = 1 << 16  # partition rows converted to float32 at once by the reduce
MERGE_ROW_BYTES = 48  # a pair in the merge's partitions: twice (child and parent), 16 B and a flag each
TOP_BLOCK = 1 << 20  # similarities to centroids computed at once by `memberships` (4 MiB)


def reach(threshold: float) -> float:
    """How far below a row's best centroid similarity a centroid may hold one of its near duplicates (2d)."""
    return 2.0 * math.sqrt(max(0.0, 2.0 * (1.0 + NORM_SLACK) ** 2 - 2.0 * threshold))


def memberships(
    centroids: np.ndarray, vectors: np.ndarray, spill: int, margin: float, device: str | None = None
) -> tuple[np.ndarray, ...]:
    """(ids [n, m], member [n, m]): each row's m = min(spill, k) nearest centroids by inner product (ties: the
    lower id first), and which of them it joins: the nearest always, the others when within `margin` of it.
    `device`: a torch device to compute them on (filters/on_device.py)."""
    m = min(spill, len(centroids))
    if device is not None:
        return _joined(*top_centroids(centroids, vectors, m, device), margin)
    columns = np.ascontiguousarray(np.asarray(centroids, np.float32).T)
    sims, ids = np.empty((len(vectors), m), np.float32), np.empty((len(vectors), m), np.int64)
    step = max(16, TOP_BLOCK // max(len(centroids), 1))  # a block of similarities stays in cache while scanned
    for start in range(0, len(vectors), step):
        stop_point()
        block = np.ascontiguousarray(vectors[start : start + step], np.float32) @ columns
        sims[start : start + len(block)], ids[start : start + len(block)] = _top(block, m)
    return _joined(sims, ids, margin)


def _joined(sims: np.ndarray, ids: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    member = sims >= sims[:, :1] - margin
    member[:, 0] = True
    return ids, member


def _top(block: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m largest of each row of `block` (which is overwritten), largest first: m passes of argmax for a few
    (1.5x faster than faiss's heap at k = 3,578, 3 of them), a partition and a sort for more."""
    rows = np.arange(len(block))
    if m <= 8:
        ids = np.empty((len(block), m), np.int64)
        sims = np.empty((len(block), m), np.float32)
        for rank in range(m):
            ids[:, rank] = block.argmax(axis=1)
            sims[:, rank] = block[rows, ids[:, rank]]
            block[rows, ids[:, rank]] = -np.inf
        return sims, ids
    ids = np.argpartition(-block, m - 1, axis=1)[:, :m]
    sims = np.take_along_axis(block, ids, axis=1)
    order = np.lexsort((ids, -sims), axis=1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


@dataclass(frozen=True)
class ClusterPlan:
    centroids: np.ndarray  # float32 [k, D], unit length
    partition: np.ndarray  # int64 [k]: the partition each cluster's rows go to
    partitions: int
    threads: int  # reduces this process may run at once: partitions hold budget_mb / threads


def prepare_clustered(dedup: Dedup, context: Context) -> Dropped | dict[str, np.ndarray]:
    shards = context.shards()
    passes = cluster_passes(
        dedup,
        context,
        lambda plan: _ClusterReduce(dedup.threshold, len(shards), dedup.device),
        len(shards) + 1,
        "dedup by embedding",
        copies=dedup.threshold,
        reduce_gpus=gpu_share(dedup.device),
    )
    if passes is None:  # no input row has an embedding
        return {shard: np.zeros(0, np.int64) for shard in shards}
    shuffle, _ = passes
    open_groups = _OpenGroups(shuffle, len(shards))
    pairs = sum(open_groups(partition).num_rows for partition in range(shuffle.partitions))  # one batch at a time
    merged = not_smallest(
        f"{context.workdir}.dedup/merge",
        shuffle.partitions,
        open_groups,
        partitions_for(pairs, MERGE_ROW_BYTES, dedup.budget_mb),
        len(shards),
        desc="dedup by embedding: merge groups",
        workers=context.workers,
        address=context.address,
    )
    return Dropped(shuffle, {shard: i for i, shard in enumerate(shards)}, merged)


def cluster_passes(
    dedup: Dedup,
    context: Context,
    reducer: Callable[[ClusterPlan], ReduceFn],
    destinations: int,
    desc: str,
    copies: float | None = None,
    reduce_gpus: float = 0.0,
) -> tuple[Shuffle, ClusterPlan] | None:
    """Steps 1-3 of a clustered step (the module's note): the plan (kept in CONTEXT.workdir.dedup/), then a map task
    per shard sending each input row to its clusters' partitions (`dedup.spill` clusters: 1, its nearest only) and
    a reduce task per partition running `reducer(plan)`, whose output has `destinations` batches. With `copies` (a
    threshold), a row whose vector came earlier in its shard goes as cluster -1 instead. None when no input row
    has an embedding. On a Ray cluster with GPUs the map tasks ask for part of one (unless `dedup.device` is cpu),
    the reduce tasks for `reduce_gpus`."""
    shards = context.shards()
    folder = f"{context.workdir}.dedup"
    plan = _plan(dedup, context, folder, desc)
    if plan is None:
        return None
    row_bytes = 2 * plan.centroids.shape[1] + 16  # a map row: the float16 vector, its position, cluster and flags
    # map tasks run side by side too: a group of shards' rows holds the share of the budget a reduce does
    group = map_group(
        len(shards),
        lambda: input_rows(context) * dedup.spill / len(shards),
        row_bytes,
        dedup.budget_mb / plan.threads,
    )
    shuffle = Shuffle(f"{folder}/shuffle", len(shards), plan.partitions, destinations, group)
    mapper = _ClusterMap(
        context.pool,
        context.inputs,
        tuple(shards),
        dedup.model_id,
        plan,
        dedup.spill,
        reach(dedup.threshold),
        copies,
        dedup.device,
    )
    # In this process the tasks run on a thread per core, each with one BLAS thread: with BLAS's own threads as
    # well, the cores are oversubscribed (6 map tasks of a 4M pool: 2.18 s on two threads, 1.07 s this way).
    with threadpool_limits(1, user_api="blas"):
        shuffle.run(
            mapper,
            reducer(plan),
            desc=desc,
            workers=context.workers,
            address=context.address,
            gpus=(gpu_share(dedup.device), reduce_gpus),
            threads=True,
            max_threads=plan.threads,  # partitions and map groups are sized for this many at once
        )
    return shuffle, plan


# --------------------------------------------------------------------------- plan


def _plan(dedup: Dedup, context: Context, folder: str, desc: str = "dedup by embedding") -> ClusterPlan | None:
    fs, root = open_fs(folder)
    path = f"{root}/plan.npz"
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            saved = np.load(io.BytesIO(handle.read()))
            # a plan written before `threads` was kept does not say what it was sized for: one reduce at a time
            # holds the budget whatever it was
            threads = int(saved["threads"]) if "threads" in saved else 1
            return ClusterPlan(saved["centroids"], saved["partition"], int(saved["partitions"]), threads)
    rows = input_rows(context)
    k = dedup.k or default_k(rows)
    wanted = dedup.sample or SAMPLE_PER_CLUSTER * k
    sample = sample_vectors(
        context, dedup.model_id, min(1.0, wanted / max(rows, 1)), dedup.seed, f"{desc}: k-means sample"
    )
    if len(sample) == 0:
        return None
    k = min(k, len(sample))
    centroids = _fit(sample, k, dedup.seed)
    margin = reach(dedup.threshold)
    row_bytes = 2 * sample.shape[1] + 16  # a partition row: the float16 vector, its position, cluster and flags
    budget_rows = dedup.budget_mb * 2**20 / row_bytes
    scale = rows / len(sample)
    # clusters are split by the budget alone, so the rows kept never depend on this machine's cores
    centroids = _split(centroids, sample, scale, budget_rows, dedup.spill, margin, dedup.seed)
    ids, member = memberships(centroids, sample, dedup.spill, margin)
    estimated = np.bincount(ids[member], minlength=len(centroids)) * scale
    # the budget is what one process holds: in this process the reduces run a partition per thread (a run resumed
    # on more cores keeps to this many, so that it holds the budget too)
    threads = local_threads(context.workers)
    partitions = max(1, math.ceil(estimated.sum() * threads / budget_rows))
    plan = ClusterPlan(centroids, _pack(estimated, partitions), partitions, threads)
    buffer = io.BytesIO()
    np.savez(
        buffer, centroids=plan.centroids, partition=plan.partition, partitions=plan.partitions, threads=plan.threads
    )
    fs.makedirs(root, exist_ok=True)
    write_atomic(fs, path, lambda handle: handle.write(buffer.getvalue()))
    return plan


def _fit(train: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k == 1:
        centroid = train.mean(axis=0, keepdims=True)
        return normalise(centroid if np.linalg.norm(centroid) > 0 else train[:1])
    return normalise(fit_kmeans(train, k, ITERATIONS, seed, spherical=True, min_points_per_centroid=1))


def _split(
    centroids: np.ndarray, sample: np.ndarray, scale: float, budget_rows: float, spill: int, margin: float, seed: int
) -> np.ndarray:
    """Clusters the sample says would hold more than `budget_rows` rows, replaced by k-means of their sample rows
    into pieces of about half the budget; a cluster that does not split (identical rows) is left as it is."""
    for _ in range(SPLIT_ROUNDS):
        ids, member = memberships(centroids, sample, spill, margin)
        estimated = np.bincount(ids[member], minlength=len(centroids)) * scale
        big = np.flatnonzero(estimated > budget_rows)
        parts, split = [centroids[estimated <= budget_rows]], False
        for cluster in big:
            rows = sample[ids[:, 0] == cluster]
            pieces = min(len(rows), math.ceil(estimated[cluster] / (budget_rows / 2)))
            if pieces < 2 or len(np.unique(rows, axis=0)) < 2:
                parts.append(centroids[cluster : cluster + 1])
                continue
            parts.append(_fit(rows, pieces, seed))
            split = True
        if not split:
            break
        centroids = np.concatenate(parts)
    return centroids


def _pack(sizes: np.ndarray, partitions: int) -> np.ndarray:
    """Clusters to partitions, largest first onto the least filled one (so partitions come out about even)."""
    heap = [(0.0, p) for p in range(partitions)]
    out = np.zeros(len(sizes), np.int64)
    for cluster in np.argsort(-sizes, kind="stable"):
        filled, p = heapq.heappop(heap)
        out[cluster] = p
        heapq.heappush(heap, (filled + float(sizes[cluster]), p))
    return out


# --------------------------------------------------------------------------- map, reduce, merge


@dataclass(frozen=True)
class _ClusterMap:
    """Map task: a shard's input rows with an embedding, once per cluster they join, to the clusters' partitions."""

    pool: Pool
    inputs: Inputs
    shards: tuple[str, ...]
    model_id: str
    plan: ClusterPlan
    spill: int
    margin: float
    copies: float | None = None  # the threshold, when copies within the shard are sent as dropped (cluster -1)
    device: str = "cpu"  # Dedup.device: where the products with the centroids run

    def __call__(self, source: int) -> tuple[pa.Table, np.ndarray]:
        data = ShardData(self.pool, self.shards[source])
        vectors, valid = data.image_vectors(self.model_id)
        chosen = np.flatnonzero(self.inputs.mask(data.shard) & valid)
        halves = vectors[chosen].astype(np.float16)
        copy = np.zeros(len(chosen), bool)
        if self.copies is not None and len(chosen):
            first = first_copies(halves)
            copy = first != np.arange(len(chosen))
            copy[copy] = self_similar(halves[first[copy]], self.copies)
        device = resolve(self.device)
        ids, member = memberships(self.plan.centroids, vectors[chosen[~copy]], self.spill, self.margin, device)
        joined, rank = np.nonzero(member)  # a row of the non-copies, once per cluster it joins
        none = np.zeros(int(copy.sum()), bool)  # the copies: one row each, as cluster -1
        row = np.concatenate([np.flatnonzero(~copy)[joined], np.flatnonzero(copy)])
        cluster = np.concatenate([ids[joined, rank], np.full(len(none), -1, np.int64)])
        pos = position(source, chosen[row])
        table = pa.table(
            {
                "cluster": arrow_of(cluster.astype(np.int64)),
                "pos": arrow_of(pos),
                "primary": arrow_of(np.concatenate([rank == 0, none])),
                "spilled": arrow_of(np.concatenate([member.sum(axis=1)[joined] > 1, none])),
                "vec": pa.FixedSizeListArray.from_arrays(arrow_of(halves[row].reshape(-1)), vectors.shape[1]),
            }
        )
        by_row = (splitmix64(pos.view(np.uint64)) % np.uint64(self.plan.partitions)).astype(np.int64)
        return table, np.where(cluster < 0, by_row, self.plan.partition[np.maximum(cluster, 0)])


@dataclass(frozen=True)
class _ClusterReduce:
    """Reduce task: each cluster of the partition compared within itself. Sends (pos, -1) of rows dropped for good to
    their shard, and (pos, first pos of its group) of groups that span clusters to destination `shards`."""

    threshold: float
    shards: int
    device: str = "cpu"  # Dedup.device: where the products within clusters run

    def __call__(self, partition: int, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        copy = numpy_of(table.column("cluster")) < 0  # copies the map found in their own shard: dropped
        pos_out, label = _groups(table, self.threshold, resolve(self.device))
        pos_out = np.concatenate([numpy_of(table.column("pos"))[copy], pos_out])
        label = np.concatenate([np.full(int(copy.sum()), -1, np.int64), label])
        destination = np.where(label < 0, pos_out >> np.int64(32), self.shards)
        return pa.table(
            {"pos": arrow_of(pos_out.astype(np.int64)), "label": arrow_of(label.astype(np.int64))}
        ), destination


def partition_clusters(table: pa.Table) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Each cluster of a partition (map rows: cluster, pos, vec): (cluster, its rows of `table` in pool order, their
    vectors as float32)."""
    if not table.num_rows:
        return
    cluster, pos = numpy_of(table.column("cluster")), numpy_of(table.column("pos"))
    vec = table.column("vec").combine_chunks()
    halves = numpy_of(vec.flatten()).reshape(len(vec), -1)
    order = np.lexsort((pos, cluster))
    starts = np.flatnonzero(np.diff(cluster[order], prepend=-1))
    for start, end in zip(starts, [*starts[1:], len(order)]):
        rows = order[start:end]
        yield int(cluster[rows[0]]), rows, halves[rows].astype(np.float32)


def _groups(table: pa.Table, threshold: float, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A partition's clusters (map rows: cluster, pos, primary, spilled, vec; rows of cluster -1 left out), each
    compared within itself: (pos, -1) for rows dropped within their cluster, (pos, its group's first pos) for the
    rows of groups that reach other clusters; singletons say nothing. Groups are components of the pairs found
    within each cluster (every member against every primary member; copies joined to their first row), so they
    never span two clusters here."""
    if not table.num_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cluster, pos = numpy_of(table.column("cluster")), numpy_of(table.column("pos"))
    order = np.lexsort((pos, cluster))  # by cluster, then pool order: a group's smallest entry is its first row
    order = order[np.searchsorted(cluster[order], 0) :]  # cluster -1: the map's copies, not compared here
    cluster, pos = cluster[order], pos[order]
    primary = numpy_of(table.column("primary"))[order]
    spilled = numpy_of(table.column("spilled"))[order]
    vec = table.column("vec").combine_chunks()
    halves = numpy_of(vec.flatten()).reshape(len(vec), -1)  # float16, in table order
    n = len(order)
    starts = np.flatnonzero(np.diff(cluster, prepend=-1))
    ends = np.append(starts[1:], n)
    groups = PairGroups(n)
    first = _collapsed_copies(halves, order, cluster, threshold)
    copy = first != np.arange(n)
    groups.add(np.flatnonzero(copy), first[copy])
    compared = primary.copy()  # a copy's first row stands for it: compared as a primary when any copy is one
    compared[first[copy & primary]] = True
    chunk_start, vectors = 0, np.zeros((0, halves.shape[1]), np.float32)
    with threadpool_limits(1, user_api="blas"):  # BLAS threads cost more than they give on products this small
        for start, end in zip(starts.tolist(), ends.tolist()):
            stop_point()
            distinct = start + np.flatnonzero(~copy[start:end])
            if len(distinct) < 2:
                continue
            if end > chunk_start + len(vectors):  # float32 copies of a few clusters at a time
                chunk_start = start
                vectors = halves[order[start : max(end, start + CHUNK_ROWS)]].astype(np.float32)
            rows = vectors[distinct - chunk_start]
            base, others = np.flatnonzero(compared[distinct]), np.flatnonzero(~compared[distinct])
            if not len(base):
                continue
            base_rows = rows[base]  # the primaries with each other once, then the other members with them
            for query, target in similar_pair_blocks(base_rows, threshold, device=device):
                groups.add(distinct[base[query]], distinct[base[target]])
            if len(others):
                for query, target in similar_pair_blocks(rows[others], threshold, base_rows, device):
                    groups.add(distinct[others[query]], distinct[base[target]])
    labels = groups.labels()
    grouped = np.bincount(labels, minlength=n)[labels] > 1
    reaching = np.bincount(labels, weights=~primary | spilled, minlength=n)[labels] > 0
    open_rows = grouped & reaching
    closed_dropped = grouped & ~reaching & (labels != np.arange(n))
    return (
        np.concatenate([pos[closed_dropped], pos[open_rows]]),
        np.concatenate([np.full(int(closed_dropped.sum()), -1, np.int64), pos[labels[open_rows]]]),
    )


def _collapsed_copies(halves: np.ndarray, order: np.ndarray, cluster: np.ndarray, threshold: float) -> np.ndarray:
    """For each row in `order` (by cluster, then pool order), the first row of its cluster with bitwise the same
    vector, where that vector surely pairs with itself; itself otherwise (positions in `order`)."""
    first = first_copies(halves, cluster, order)
    copy = np.flatnonzero(first != np.arange(len(first)))
    apart = copy[~self_similar(halves[order[first[copy]]], threshold)]
    first[apart] = apart
    return first


@dataclass(frozen=True)
class _OpenGroups:
    """The (pos, first pos of its group) pairs of groups spanning clusters, as one reduce task sent them."""

    shuffle: Shuffle
    shards: int

    def __call__(self, partition: int) -> pa.Table:
        return pa.Table.from_batches([read_batch(self.shuffle.reduce_path(partition), self.shards)])
