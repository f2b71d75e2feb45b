"""dedup at scale: the partitioned exact dedup against the in-driver one it replaced, the clustered near dedup
against the exact all-pairs search, on planted duplicates; resumed after a kill; on Ray."""

from __future__ import annotations

import hashlib
import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from clipsift.filters import dedup as dedup_module
from clipsift.filters import near_dedup as near_module
from clipsift.filters.base import Context, Inputs, ShardData
from clipsift.filters.dedup import Dedup, similar_pair_blocks
from clipsift.filters.near_dedup import _plan, memberships, reach
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, encode_uids, read_subset
from clipsift.pipeline.partition import partitions_for, read_batch
from clipsift.pipeline.pool import Pool, embeddings_schema, finalize_pool, write_metadata

from conftest import printed_without_pandas


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def metadata_pool(root: Path, shard_sizes: list[int], sha256: list, urls: list, vectors: np.ndarray | None) -> Pool:
    """A metadata-only pool (no tars; enough for filters): uid i = md5 of i; embeddings of model `m` if given."""
    start = 0
    for index, size in enumerate(shard_sizes):
        rows = range(start, start + size)
        uids = [hashlib.md5(str(i).encode()).hexdigest() for i in rows]
        table = pa.table(
            {
                "uid": uids,
                "key": [f"{index:08d}_{i:08d}" for i in range(size)],
                "text": ["a cat"] * size,
                "url": pa.array(urls[start : start + size], pa.string()),
                "original_width": pa.array([300] * size, pa.int32()),
                "original_height": pa.array([300] * size, pa.int32()),
                "sha256": pa.array(sha256[start : start + size], pa.string()),
            }
        )
        write_metadata(str(root), index, table)
        if vectors is not None:
            dim = vectors.shape[1]
            emb = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[rows.start : rows.stop].astype(np.float16).ravel()), dim
            )
            Pool(str(root)).write_embeddings(
                "m",
                f"{index:08d}",
                pa.table(
                    [pa.array(uids), emb, emb, pa.array(np.full(size, 0.3, np.float32)), pa.array(["ok"] * size)],
                    schema=embeddings_schema(dim),
                ),
            )
        start += size
    finalize_pool(str(root), "test", [])
    return Pool(str(root))


def run(pool: Pool, tmp_path: Path, steps: str, name: str, workers: int = 1) -> list[str]:
    (tmp_path / f"{name}.yaml").write_text(f"steps: {steps}")
    apply_recipe(pool.url, load_recipe(str(tmp_path / f"{name}.yaml")), str(tmp_path / f"{name}.npy"), workers=workers)
    return decode_uids(read_subset(str(tmp_path / f"{name}.npy")))


def in_driver_dedup(pool: Pool, column: str, rows_of=None) -> list[str]:
    """The in-driver dedup this replaced: every shard's keys gathered here in pool order, np.unique's first index."""
    uids, keys = [], []
    for shard in pool.shard_ids():
        table = pool.metadata(shard, ["uid", column])
        selected = table[column].is_valid().to_numpy(zero_copy_only=False)
        if rows_of is not None:
            selected &= rows_of(shard)
        values = table[column].filter(selected)
        if column == "sha256":
            values = encode_uids(pc.utf8_slice_codeunits(pc.utf8_lower(values), 0, 32))
        else:
            values = np.array(values.to_pylist(), dtype=object)
        keys.append(values)
        uids += table["uid"].filter(selected).to_pylist()
    everything = np.concatenate(keys)
    first = np.unique(everything if column == "sha256" else everything.astype(str), return_index=True)[1]
    kept = set(np.array(uids)[first])
    unkeyed = [u for s in pool.shard_ids() for u, ok in _unkeyed(pool, s, column, rows_of) if ok]
    return sorted(kept | set(unkeyed))


def _unkeyed(pool: Pool, shard: str, column: str, rows_of):
    """Rows the step sees that have no key: never grouped, so kept."""
    table = pool.metadata(shard, ["uid", column])
    seen = rows_of(shard) if rows_of is not None else np.ones(table.num_rows, bool)
    return zip(table["uid"].to_pylist(), seen & ~table[column].is_valid().to_numpy(zero_copy_only=False))


@pytest.fixture
def keyed_pool(tmp_path: Path) -> Pool:
    """600 rows in shards of uneven sizes; about 120 distinct images and 40 distinct urls: copies within shards and
    across them, digests in either case, some rows without a digest or url."""
    rng = np.random.default_rng(5)
    images = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(120)]
    sha = [images[int(i)] for i in rng.integers(0, 120, 600)]
    sha = [s.upper() if rng.random() < 0.2 else s for s in sha]  # one image, either case: one key
    for i in rng.choice(600, 40, replace=False):
        sha[i] = None
    urls = [f"http://x.test/{int(i)}" for i in rng.integers(0, 40, 600)]
    urls[7] = None
    return metadata_pool(tmp_path / "pool", [90, 130, 5, 160, 1, 120, 94], sha, urls, None)


def test_partitioned_exact_dedup_equals_the_in_driver_dedup(keyed_pool: Pool, tmp_path: Path) -> None:
    for column in ("sha256", "url"):
        oracle = in_driver_dedup(keyed_pool, column)
        assert 100 < len(oracle) < 600 if column == "sha256" else 35 < len(oracle) < 45
        # 0.0005 MiB per partition: 600 keys spread over 55 partitions
        got = run(keyed_pool, tmp_path, f"[{{dedup: {{by: {column}, budget_mb: 0.0005}}}}]", f"{column}-many")
        assert got == oracle
        assert run(keyed_pool, tmp_path, f"[{{dedup: {{by: {column}}}}}]", f"{column}-one") == oracle

    # after another step only the rows it kept are grouped: a later copy becomes the first one
    drop_first = "[{not: {dedup: {by: url}}}, {dedup: {by: sha256, budget_mb: 0.0005}}]"
    first_of_url = list(in_driver_dedup(keyed_pool, "url"))

    def seen(shard: str) -> np.ndarray:
        return ~np.isin(keyed_pool.metadata(shard, ["uid"])["uid"].to_numpy(zero_copy_only=False), first_of_url)

    assert run(keyed_pool, tmp_path, drop_first, "seq") == in_driver_dedup(keyed_pool, "sha256", seen)


def test_a_key_held_by_most_rows_sends_its_partition_one_row_per_shard(tmp_path: Path) -> None:
    """A map marks the rows whose key came earlier in its own shard and spreads them by position: a key held by
    most of the pool (an empty caption, a placeholder image) fills no partition alone. Same rows kept."""
    n, shards = 1200, 6
    urls = [None if i % 50 == 7 else ("http://same" if i % 5 else f"http://u/{i % 35}") for i in range(n)]
    pool = metadata_pool(tmp_path / "skewed", [n // shards] * shards, [None] * n, urls, None)
    oracle = in_driver_dedup(pool, "url")
    assert run(pool, tmp_path, "[{dedup: {by: url, budget_mb: 0.001}}]", "skewed") == oracle
    assert len(oracle) == 8 + 24  # 8 urls, and the rows without one
    context = Context(pool, Inputs(pool), str(tmp_path / "step"), workers=1)
    state = Dedup(by="url", budget_mb=0.001).prepare(context)
    assert state.shuffle.partitions > 3
    sent = 0
    for source in range(shards):
        for partition in range(state.shuffle.partitions):
            batch = read_batch(state.shuffle.map_path(source), partition)
            sent += sum(
                u == "http://same" and not later
                for u, later in zip(batch["key"].to_pylist(), batch["later"].to_pylist())
            )
    assert sent == shards  # by key: its first row in each shard; its 900 others went by position


def dedup_masks(pool: Pool, state) -> list[np.ndarray]:
    step = Dedup(by="sha256")
    return [step.keep(state, ShardData(pool, s), np.ones(pool.num_rows(s), bool)) for s in pool.shard_ids()]


def test_exact_dedup_resumes_after_a_kill(keyed_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = Context(keyed_pool, Inputs(keyed_pool), str(tmp_path / "step-1"), workers=1)
    step = Dedup(by="sha256", budget_mb=0.0005)
    calls: list[int] = []
    real_map = dedup_module._KeyMap.__call__

    def killed(self, source: int):
        if source == 4:
            raise KeyboardInterrupt  # killed in the middle of the map pass
        calls.append(source)
        return real_map(self, source)

    monkeypatch.setattr(dedup_module._KeyMap, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        step.prepare(context)
    folder = tmp_path / "step-1.dedup"
    assert sorted(p.name for p in (folder / "map").iterdir()) == [f"{s:08d}.arrow" for s in range(4)]
    assert not list((folder / "reduce").iterdir())
    monkeypatch.setattr(
        dedup_module._KeyMap, "__call__", lambda self, source: calls.append(source) or real_map(self, source)
    )
    state = step.prepare(context)
    assert calls == [0, 1, 2, 3, 4, 5, 6]  # the re-run mapped only the shards the killed one had not
    kept = dedup_masks(keyed_pool, state)
    uids = [u for s in keyed_pool.shard_ids() for u in keyed_pool.metadata(s, ["uid"])["uid"].to_pylist()]
    assert sorted(np.array(uids)[np.concatenate(kept)]) == in_driver_dedup(keyed_pool, "sha256")

    # outputs lost after the reduce pass: those are redone, the rest reused, the result the same
    reduce_files = sorted((folder / "reduce").iterdir())
    assert len(reduce_files) == partitions_for(600, dedup_module.KEY_ROW_BYTES, 0.0005) == 55
    for lost in reduce_files[::5]:
        lost.unlink()
    calls.clear()
    again = step.prepare(context)
    assert calls == []  # the map outputs were all there: only the lost reduce outputs were made again
    assert len(list((folder / "reduce").iterdir())) == 55
    assert all(np.array_equal(a, b) for a, b in zip(dedup_masks(keyed_pool, again), kept))


def test_dedup_state_holds_no_rows(tmp_path: Path) -> None:
    """The driver keeps no per-row state: what every shard task receives is the same size for 10x the rows."""
    sizes = []
    for rows in (400, 4_000):
        digests = [hashlib.sha256(str(i % (rows // 4)).encode()).hexdigest() for i in range(rows)]
        pool = metadata_pool(tmp_path / f"pool{rows}", [rows // 4] * 4, digests, [None] * rows, None)
        context = Context(pool, Inputs(pool), str(tmp_path / f"step{rows}"), workers=1)
        state = Dedup(by="sha256").prepare(context)
        assert sum(int((~m).sum()) for m in dedup_masks(pool, state)) == rows - rows // 4
        sizes.append(len(pickle.dumps(state)))
    assert sizes[0] == sizes[1] - len(str(tmp_path / "step4000")) + len(str(tmp_path / "step400"))


# --------------------------------------------------------------------------- near duplicates


def planted(rng: np.random.Generator, n: int, dim: int, clustered: bool) -> np.ndarray:
    """n unit vectors, about 8% of them near copies (cosine 0.96-0.995) of another row, some copies of copies.
    clustered: drawn around n/100 topics, as real embeddings are; else uniform on the sphere (the hardest case)."""
    if clustered:
        topics = unit(rng.normal(size=(max(2, n // 100), dim)))
        vectors = unit(topics[rng.integers(0, len(topics), n)] + rng.normal(size=(n, dim)) / np.sqrt(dim))
    else:
        vectors = unit(rng.normal(size=(n, dim)))
    for target in rng.choice(n, n // 12, replace=False):
        source = vectors[rng.integers(0, n)]
        noise = unit(rng.normal(size=(1, dim)))[0]
        noise = unit((noise - (noise @ source) * source)[None])[0]
        cosine = rng.uniform(0.96, 0.995)
        vectors[target] = cosine * source + np.sqrt(1 - cosine**2) * noise
    return unit(vectors)


def all_pairs_kept(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows kept by exact near dedup, as the pool stores them (float16): first row of each connected group (BFS)."""
    stored = vectors.astype(np.float16).astype(np.float32)
    similar = stored @ stored.T >= threshold
    seen, kept = np.zeros(len(stored), bool), []
    for start in range(len(stored)):
        if seen[start]:
            continue
        kept.append(start)
        stack, seen[start] = [start], True
        while stack:
            for other in np.flatnonzero(similar[stack.pop()] & ~seen):
                seen[other] = True
                stack.append(int(other))
    return kept


def uids(indices) -> list[str]:
    return sorted(hashlib.md5(str(i).encode()).hexdigest() for i in indices)


def near_pool(tmp_path: Path, vectors: np.ndarray, name: str = "near") -> Pool:
    n = len(vectors)
    sizes = [n // 5] * 4 + [n - 4 * (n // 5)]
    return metadata_pool(tmp_path / name, sizes, [None] * n, [None] * n, vectors)


def test_clustered_near_dedup_equals_all_pairs_on_clustered_embeddings(tmp_path: Path) -> None:
    vectors = planted(np.random.default_rng(11), 1500, 16, clustered=True)
    pool = near_pool(tmp_path, vectors)
    expected = uids(all_pairs_kept(vectors, 0.95))
    assert 1360 < len(expected) < 1400  # about 125 planted copies dropped
    assert run(pool, tmp_path, "[{dedup: {by: embedding, model_id: m, method: exact}}]", "exact") == expected
    # the defaults (k: sqrt(1500) = 38 clusters, spill 3), and several partitions of 0.02 MiB
    got = run(pool, tmp_path, "[{dedup: {by: embedding, model_id: m, budget_mb: 0.02}}]", "clustered")
    assert got == expected


def test_clustered_near_dedup_is_exact_when_every_row_may_spill(tmp_path: Path) -> None:
    """Uniform vectors straddle cluster boundaries everywhere: spill 1 misses pairs; with spill >= k the method is
    provably exact, also with clusters split to fit a small budget."""
    vectors = planted(np.random.default_rng(12), 1200, 16, clustered=False)
    pool = near_pool(tmp_path, vectors)
    expected = uids(all_pairs_kept(vectors, 0.95))
    near = "[{dedup: {by: embedding, model_id: m, k: 12, spill: %d, budget_mb: %s}}]"
    one = run(pool, tmp_path, near % (1, 1), "spill1")
    assert set(one) > set(expected)  # pairs across clusters missed, and nothing dropped wrongly
    assert run(pool, tmp_path, near % (1000, 1), "all") == expected
    # 0.004 MiB holds about 90 rows of 48 bytes: the 12 clusters are split and spread over many partitions
    context = Context(pool, Inputs(pool), str(tmp_path / "plan"), workers=1)
    plan = _plan(Dedup(by="embedding", model_id="m", k=12, budget_mb=0.004, sample=1200), context, str(tmp_path / "p"))
    assert len(plan.centroids) > 12 and plan.partitions > 10
    assert run(pool, tmp_path, near % (1000, 0.004), "split") == expected


def test_spilled_rows_join_only_centroids_within_reach() -> None:
    rng = np.random.default_rng(13)
    centroids = unit(rng.normal(size=(20, 8)))
    vectors = unit(rng.normal(size=(500, 8)))
    sims = vectors @ centroids.T
    ids, member = memberships(centroids, vectors, 3, reach(0.99))
    best = np.sort(sims, axis=1)[:, ::-1]
    assert np.array_equal(ids[:, 0], sims.argmax(axis=1))
    assert np.array_equal(member[:, 1:], best[:, 1:3] >= best[:, :1] - reach(0.99))
    assert member[:, 0].all() and 0 < member[:, 1].mean() < 1  # some rows spill, some do not
    assert reach(1.0) < 0.3 and reach(0.5) > 1.9  # tight thresholds reach few centroids, loose ones every one


def similar_pairs(*args) -> tuple[np.ndarray, np.ndarray]:
    blocks = list(similar_pair_blocks(*args))
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def test_similar_pairs_against_a_base_and_each_pair_of_rows_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a base: every (row, base row) pair. Without one (the reduce's primaries with each other, the exact
    method's rows): each pair of two rows once, i < j, a row never with itself; in one block or in many."""
    rng = np.random.default_rng(15)
    vectors = unit(rng.normal(size=(300, 4))).astype(np.float32)
    base = vectors[[0, 5, 17, 150, 299]]
    with_base = {(int(i), int(j)) for i, j in zip(*np.nonzero(vectors @ base.T >= 0.9))}
    upper = {(int(i), int(j)) for i, j in zip(*np.nonzero(vectors @ vectors.T >= 0.9)) if i < j}
    assert 0 < len(with_base) < 300 and len(upper) > 300
    for entries in (1 << 22, 20, 1000):  # one block; blocks of 4 rows (of 5 and then of 1 against themselves)
        monkeypatch.setattr(dedup_module, "BLOCK_ENTRIES", entries)
        query, target = similar_pairs(vectors, 0.9, base)
        assert set(zip(query.tolist(), target.tolist())) == with_base
        query, target = similar_pairs(vectors, 0.9)
        assert len(query) == len(upper) and set(zip(query.tolist(), target.tolist())) == upper


@pytest.fixture
def own_ray():
    import ray

    yield
    ray.shutdown()


def test_dedup_on_ray_equals_in_process(keyed_pool: Pool, tmp_path: Path, own_ray: None) -> None:
    vectors = planted(np.random.default_rng(14), 600, 16, clustered=True)
    vectors[540:] = vectors[np.random.default_rng(15).integers(0, 540, 60)]  # copies, in the last shard and others
    pool = metadata_pool(
        tmp_path / "both", [150, 100, 200, 150], keyed_pool_digests(keyed_pool), [None] * 600, vectors
    )
    steps = "[{dedup: {by: sha256, budget_mb: 0.0005}}, {dedup: {by: embedding, model_id: m, budget_mb: 0.01}}]"
    here = run(pool, tmp_path, steps, "here")
    assert run(pool, tmp_path, steps, "ray", workers=2) == here
    assert here == sorted(set(in_driver_dedup(pool, "sha256")) & set(uids(all_pairs_kept_among(vectors, pool))))


def keyed_pool_digests(pool: Pool) -> list:
    return [d for s in pool.shard_ids() for d in pool.metadata(s, ["sha256"])["sha256"].to_pylist()]


def all_pairs_kept_among(vectors: np.ndarray, pool: Pool) -> list[int]:
    """Exact near dedup over the rows that survive the sha256 dedup (the second step's input)."""
    survivors = set(in_driver_dedup(pool, "sha256"))
    rows = [i for i in range(len(vectors)) if hashlib.md5(str(i).encode()).hexdigest() in survivors]
    return [rows[i] for i in all_pairs_kept(vectors[rows], 0.95)]


def test_dedup_semdedup_and_caption_quality_runs_import_no_pandas(tmp_path: Path) -> None:
    """Exact dedup (a key shuffle), clustered near dedup, semdedup and caption_quality stay clear of pandas, whose
    import (pyarrow's conversions to and from NumPy go through it) costs about 0.5 s of every process and Ray
    worker."""
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((300, 16)))
    vectors[1::7] = vectors[0::7][: len(vectors[1::7])]  # exact copies: something to drop
    sha = [f"{i % 250:064x}" for i in range(300)]
    pool = metadata_pool(tmp_path / "pool", [100, 100, 100], sha, [f"u{i}" for i in range(300)], vectors)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "steps: [{caption_quality: {}}, {dedup: {by: sha256}}, {dedup: {by: embedding, model_id: m, threshold: 0.99}},"
        " {semdedup: {model_id: m, eps: 0.05}}]"
    )
    (kept,) = printed_without_pandas(
        "from clipsift.filters.recipe import apply_recipe, load_recipe\n"
        f"r = apply_recipe({pool.url!r}, load_recipe({str(recipe)!r}), {str(tmp_path / 's.npy')!r}, workers=1)\n"
        "print(r.num_uids)"
    )
    assert 0 < int(kept) < 250


def test_many_identical_images_are_grouped_in_memory_that_grows_with_them_not_their_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A placeholder image copied n times makes n^2 similar pairs. The exact method groups them holding at most
    about EDGE_CAP pairs (here 5,000, against 1,200 x 1,199 / 2 = 719,400 pairs); the clustered one never makes
    them (copies are joined to their first row); both keep the first copy."""
    rng = np.random.default_rng(21)
    vectors = unit(rng.normal(size=(2000, 16)))
    copies = np.sort(rng.choice(2000, 1200, replace=False))
    vectors[copies] = vectors[copies[0]]
    expected = uids(all_pairs_kept(vectors, 0.95))
    assert len(expected) < 2000 - 1150  # the copies but the first dropped
    fed, held = [], []
    add = dedup_module.PairGroups.add

    def counted(self, sources, targets) -> None:
        add(self, sources, targets)
        fed.append(len(sources))
        held.append(self.held)

    monkeypatch.setattr(dedup_module, "EDGE_CAP", 5000)
    monkeypatch.setattr(dedup_module.PairGroups, "add", counted)
    pool = near_pool(tmp_path, vectors)
    for method in ("exact", "clustered"):
        fed.clear(), held.clear()
        steps = f"[{{dedup: {{by: embedding, model_id: m, method: {method}}}}}]"
        assert run(pool, tmp_path, steps, method) == expected
        if method == "exact":
            assert sum(fed) >= 1200 * 1199 // 2  # the pairs of the copies, each once, block by block
            assert max(held) <= 5000 + max(fed)  # never more than the cap and one block
        else:
            assert sum(fed) < 5_000  # a copy's edge to its first row, and the few pairs of distinct vectors


def test_copies_of_one_vector_reach_their_cluster_once_per_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A placeholder copied 1,200 times over the 5 shards: the map sends its cluster one copy per shard (the others
    go as dropped), the reduce compares one row per distinct vector, and the kept rows are the exact search's."""
    rng = np.random.default_rng(22)
    vectors = planted(rng, 2000, 16, clustered=True)
    copies = np.sort(rng.choice(2000, 1200, replace=False))
    vectors[copies] = vectors[copies[0]]
    placeholder = vectors[copies[0]].astype(np.float16)
    arrived, compared = [], []
    groups, blocks = near_module._groups, near_module.similar_pair_blocks

    def recording_groups(table: pa.Table, threshold: float, *device):
        halves = np.asarray(table.column("vec").combine_chunks().flatten()).reshape(table.num_rows, -1)
        clustered = np.asarray(table.column("cluster")) >= 0  # -1: dropped by the map as a copy
        arrived.append(int(((halves == placeholder).all(axis=1) & clustered).sum()))
        return groups(table, threshold, *device)

    def recording_blocks(rows: np.ndarray, *args, **kwargs):
        compared.append(int((rows.astype(np.float16) == placeholder).all(axis=1).sum()))
        return blocks(rows, *args, **kwargs)

    monkeypatch.setattr(near_module, "_groups", recording_groups)
    monkeypatch.setattr(near_module, "similar_pair_blocks", recording_blocks)
    pool = near_pool(tmp_path, vectors)
    assert run(pool, tmp_path, "[{dedup: {by: embedding, model_id: m}}]", "clustered") == uids(
        all_pairs_kept(vectors, 0.95)
    )
    assert 1 <= sum(arrived) <= 5 * 3  # one copy a shard, in each of its (at most spill = 3) clusters
    assert max(compared) == 1  # one row of the placeholder in any cluster's products


@pytest.mark.parametrize("threshold", [0.9999, 0.99995])
def test_copies_are_joined_only_when_they_surely_pair(tmp_path: Path, threshold: float) -> None:
    """At thresholds near 1, a float16 vector's similarity with itself may fall below: copies are then compared like
    other rows, and the kept rows stay the exact search's."""
    rng = np.random.default_rng(23)
    vectors = planted(rng, 600, 16, clustered=True)
    vectors[300:400] = vectors[rng.integers(0, 300, 100)]
    pool = near_pool(tmp_path, vectors)
    steps = f"[{{dedup: {{by: embedding, model_id: m, threshold: {threshold}, spill: 1000}}}}]"
    expected = uids(all_pairs_kept(vectors, threshold))
    assert len(expected) > 500  # some copies surely pair, some do not
    assert run(pool, tmp_path, steps, "clustered") == expected


def test_near_dedup_runs_a_task_per_thread_here_with_one_blas_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker count on a 2-core machine: the map and reduce stay in this process on two threads (a local
    cluster would add no cores), each with one BLAS thread, partitions sized to half the budget; same rows kept."""
    import threading

    from threadpoolctl import threadpool_info

    from clipsift.pipeline import parallel

    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    vectors = planted(np.random.default_rng(16), 1500, 16, clustered=True)
    pool = near_pool(tmp_path, vectors)
    seen, groups = [], near_module._groups

    def recording_groups(*args):
        # NumPy's BLAS, which the products use (faiss's own, for k-means, is not used here)
        blas = [pool["num_threads"] for pool in threadpool_info() if "numpy" in pool["filepath"]]
        seen.append((threading.get_ident(), max(blas, default=1)))
        time.sleep(0.05)  # long enough for the other thread to take the next partition meanwhile
        return groups(*args)

    monkeypatch.setattr(near_module, "_groups", recording_groups)
    steps = "[{dedup: {by: embedding, model_id: m, budget_mb: 0.02}}]"
    assert run(pool, tmp_path, steps, "threads", workers=None) == uids(all_pairs_kept(vectors, 0.95))
    assert len(seen) > 4 and threading.get_ident() not in {ident for ident, _ in seen}
    assert len({ident for ident, _ in seen}) == 2 and {blas for _, blas in seen} == {1}


def test_the_rows_kept_do_not_depend_on_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions shrink with the threads of this process, but clusters are split by the budget alone: on uniform
    rows (pairs across clusters everywhere) a 4-core machine keeps what one core keeps."""
    from clipsift.pipeline import parallel

    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)
    vectors = planted(np.random.default_rng(12), 1200, 16, clustered=False)
    pool = near_pool(tmp_path, vectors)
    steps = "[{dedup: {by: embedding, model_id: m, k: 12, budget_mb: 0.02}}]"
    kept = {}
    for cores in (1, 4):
        monkeypatch.setattr(parallel, "usable_cores", lambda cores=cores: cores)
        kept[cores] = run(pool, tmp_path, steps, f"cores{cores}", workers=None)
    assert kept[1] == kept[4] == run(pool, tmp_path, steps, "one", workers=1)


def test_a_plan_made_for_one_thread_resumes_on_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions are sized to the budget divided by the threads that were to run them: a run planned with
    --workers 1 (whole-budget partitions), killed, and resumed on 4 cores runs one reduce at a time, not 4 (4x the
    budget); a run planned on 4 cores runs them side by side. The rows kept are the same."""
    import threading

    from clipsift.pipeline import parallel

    monkeypatch.delenv(parallel.LOCAL_MAX_SECONDS_ENV, raising=False)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 4)
    vectors = planted(np.random.default_rng(17), 1500, 16, clustered=True)
    pool = near_pool(tmp_path, vectors)
    groups, lock = near_module._groups, threading.Lock()
    running, most = [0], [0]

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)  # long enough for other threads to take the next partitions meanwhile
            return groups(*args)
        finally:
            with lock:
                running[0] -= 1

    def killed(*args):
        raise KeyboardInterrupt

    steps = "[{dedup: {by: embedding, model_id: m, budget_mb: 0.02}}]"
    (tmp_path / "r.yaml").write_text(f"steps: {steps}")
    monkeypatch.setattr(near_module, "_groups", killed)
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(pool.url, load_recipe(str(tmp_path / "r.yaml")), str(tmp_path / "resumed.npy"), workers=1)
    monkeypatch.setattr(near_module, "_groups", counted)
    apply_recipe(pool.url, load_recipe(str(tmp_path / "r.yaml")), str(tmp_path / "resumed.npy"), workers=None)
    assert most[0] == 1
    truth = uids(all_pairs_kept(vectors, 0.95))
    assert decode_uids(read_subset(str(tmp_path / "resumed.npy"))) == truth
    most[0] = 0
    assert run(pool, tmp_path, steps, "fresh", workers=None) == truth
    assert most[0] > 1

    # killed in the map pass instead: the maps left run one at a time too (map groups are sized like partitions)
    real_map, maps_running, maps_most = near_module._ClusterMap.__call__, [0], [0]

    def killed_map(self, source):
        raise KeyboardInterrupt

    def counted_map(self, source):
        with lock:
            maps_running[0] += 1
            maps_most[0] = max(maps_most[0], maps_running[0])
        try:
            time.sleep(0.05)
            return real_map(self, source)
        finally:
            with lock:
                maps_running[0] -= 1

    (tmp_path / "m.yaml").write_text("steps: [{dedup: {by: embedding, model_id: m, budget_mb: 0.021}}]")
    monkeypatch.setattr(near_module._ClusterMap, "__call__", killed_map)
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(pool.url, load_recipe(str(tmp_path / "m.yaml")), str(tmp_path / "m.npy"), workers=1)
    monkeypatch.setattr(near_module._ClusterMap, "__call__", counted_map)
    apply_recipe(pool.url, load_recipe(str(tmp_path / "m.yaml")), str(tmp_path / "m.npy"), workers=None)
    assert maps_most[0] == 1 and decode_uids(read_subset(str(tmp_path / "m.npy"))) == truth


def test_map_tasks_over_groups_of_shards_keep_the_same_rows(
    keyed_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pools of over GROUP_ABOVE shards map groups of shards into one file each (so that a reduce opens fewer
    files): dedup by key and near dedup keep the same rows as with a map file per shard."""
    from clipsift.pipeline import partition as partition_module

    vectors = planted(np.random.default_rng(21), 1000, 16, clustered=True)
    near = near_pool(tmp_path, vectors)
    steps = {
        "sha256": (keyed_pool, "[{dedup: {by: sha256, budget_mb: 0.01}}]"),
        "near": (near, "[{dedup: {by: embedding, model_id: m, budget_mb: 0.1}}]"),
    }
    plain = {name: run(pool, tmp_path, recipe, f"{name}-plain") for name, (pool, recipe) in steps.items()}
    monkeypatch.setattr(partition_module, "GROUP_ABOVE", 1)
    groups = []
    real = partition_module._map_task
    monkeypatch.setattr(
        partition_module,
        "_map_task",
        lambda shuffle, fn, file: groups.append(shuffle.group) or real(shuffle, fn, file),
    )
    for name, (pool, recipe) in steps.items():
        groups.clear()
        assert run(pool, tmp_path, recipe, f"{name}-grouped") == plain[name]
        assert max(groups) > 1, name  # shards did share map files
    assert plain["near"] == uids(all_pairs_kept(vectors, 0.95))
