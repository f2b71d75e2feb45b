"""norm_sim: NormSim-inf by blocks of |V @ U^T|, the target read only when a shard needs scoring, and its
dimension checked once, in prepare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsift.filters import norm_sim as ns
from clipsift.filters.base import RecipeError
from clipsift.filters.scores import ScoreFiles

from filter_support import D, build_pool, run, uids_of, write_model

N, PER_SHARD = 30, 10


def brute_max_abs(vectors: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.array([max((abs(float(np.dot(v, u))) for u in target), default=0.0) for v in vectors])


@pytest.mark.parametrize("block", [1, 7, 40, 1 << 22])  # one entry, blocks across rows and columns, all at once
def test_max_abs_similarity_matches_a_loop_whatever_the_block(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    rng = np.random.default_rng(block)
    vectors, target = rng.normal(size=(23, D)).astype(np.float32), rng.normal(size=(9, D)).astype(np.float32)
    target[4] = -3 * vectors[5]  # a large negative similarity counts by its absolute value
    monkeypatch.setattr(ns, "BLOCK_ENTRIES", block)
    got = ns.max_abs_similarity(vectors, target)
    np.testing.assert_allclose(got, brute_max_abs(vectors, target), rtol=1e-5)
    assert got[5] == pytest.approx(3 * float(vectors[5] @ vectors[5]), rel=1e-5)
    assert np.array_equal(ns.max_abs_similarity(vectors, np.zeros((0, D), np.float32)), np.zeros(23))


@pytest.fixture
def scored(tmp_path: Path):
    rng = np.random.default_rng(6)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    vectors = rng.normal(size=(N, D))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_model(pool, "m", np.full(N, 0.3), vectors)
    target = rng.normal(size=(5, D))
    np.save(tmp_path / "target.npy", target)
    stored = vectors.astype(np.float16).astype(np.float64)  # the pool's vectors are used as stored
    unit = target / np.linalg.norm(target, axis=1, keepdims=True)  # the target's are normalised on load
    return pool, brute_max_abs(stored, unit)


def test_a_rerun_whose_shards_are_all_scored_reads_no_target(
    tmp_path: Path, scored, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, scores = scored
    recipe = f"steps: [{{norm_sim: {{model_id: m, target: {tmp_path / 'target.npy'}, p: inf, threshold: 0.5}}}}]"
    cutoff, loads = ScoreFiles.cutoff, []

    def dies(self, owner, context, dtype=np.float32):  # killed after every shard's score file, before the state
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ScoreFiles, "cutoff", dies)
    with pytest.raises(KeyboardInterrupt):
        run(pool, tmp_path, recipe)
    assert len(list((tmp_path / "r.work").glob("*/step-1.scores/*.npy"))) == N // PER_SHARD
    monkeypatch.setattr(ScoreFiles, "cutoff", cutoff)
    load = ns.load_vectors
    monkeypatch.setattr(ns, "load_vectors", lambda *a: loads.append(a) or load(*a))
    assert run(pool, tmp_path, recipe) == uids_of(np.flatnonzero(scores >= 0.5))
    assert loads == []  # every shard had its scores: prepare only took the threshold
    assert 0 < int((scores >= 0.5).sum()) < N and np.abs(scores - 0.5).min() > 1e-4  # no score near the cut


def test_a_target_of_another_dimension_stops_prepare_before_any_shard(
    tmp_path: Path, scored, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _ = scored
    np.save(tmp_path / "wide.npy", np.ones((3, D + 2)))
    tasks = []
    monkeypatch.setattr(ns, "shard_norm_sim", lambda *a: tasks.append(a) or None)
    with pytest.raises(RecipeError, match=rf"target .*wide.npy have dimension {D + 2}, the pool's embeddings .* {D}"):
        run(pool, tmp_path, f"steps: [{{norm_sim: {{model_id: m, target: {tmp_path / 'wide.npy'}, fraction: 0.5}}}}]")
    assert tasks == []
    assert ns.embedding_dim(pool, "m") == D
