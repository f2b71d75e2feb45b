"""neg_clip_loss, norm_sim and external_score against brute-force numpy / plain-Python computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift.filters import neg_clip_loss as ncl
from clipsift.filters.base import RecipeError, ShardData
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool, derive_uid, embeddings_table

from conftest import image_bytes
from filter_support import D, build_pool, run, uids_of

N, PER_SHARD = 70, 25  # shards of 25, 25 and 20 rows


def uid(n: int) -> str:
    return derive_uid(f"row/{n}")


def write_pair_model(pool: Pool, model_id: str, image: np.ndarray, text: np.ndarray, missing: np.ndarray) -> None:
    """Embeddings with distinct image and text vectors (rows in `missing` have none)."""
    offset = 0
    for shard in pool.shard_ids():
        uids = pool.metadata(shard, ["uid"]).column("uid").to_pylist()
        part = slice(offset, offset + len(uids))
        status = ["no image" if m else "ok" for m in missing[part]]
        pool.write_embeddings(model_id, shard, embeddings_table(uids, image[part], text[part], status))
        offset += len(uids)


def stored_vectors(pool: Pool, model_id: str, column: str) -> list[np.ndarray | None]:
    """Every row's stored vector as float64 (None without one), read back as Python lists."""
    out = []
    for shard in pool.shard_ids():
        for value in pool.embeddings(model_id, shard, [column]).column(column).to_pylist():
            out.append(None if value is None else np.array(value, np.float64))
    return out


def rank_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's threshold by its definition: the score at rank int(N f) of all rows sorted descending."""
    ranked = sorted((-np.inf if np.isnan(s) else s for s in scores), reverse=True)
    rank = int(len(scores) * fraction)
    return ranked[rank] if rank < len(ranked) else -np.inf


def kept_at(scores: np.ndarray, threshold: float) -> list[str]:
    return uids_of(i for i, s in enumerate(scores) if not np.isnan(s) and s >= threshold)


def midway(scores: np.ndarray, share: float) -> float:
    """A threshold halfway between two neighbouring scores, about `share` of the way up (no score sits on it)."""
    finite = np.sort(scores[~np.isnan(scores)])
    k = int(len(finite) * share)
    return float((finite[k - 1] + finite[k]) / 2)


def assert_well_separated(scores: np.ndarray) -> None:
    """No two scores closer than float rounding could blur (so the ranking cannot depend on it)."""
    finite = np.sort(scores[~np.isnan(scores)])
    assert np.diff(finite).min() > 1e-5


@pytest.fixture
def pair_pool(tmp_path: Path) -> tuple[Pool, np.ndarray]:
    rng = np.random.default_rng(11)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    image = rng.normal(size=(N, D))
    text = image + rng.normal(scale=rng.uniform(0.3, 2.0, (N, 1)), size=(N, D))  # matched, some loosely
    missing = np.zeros(N, bool)
    missing[[3, 30, 31, 64]] = True
    write_pair_model(pool, "m", image, text, missing)
    return pool, missing


# --------------------------------------------------------------------------- neg_clip_loss


def brute_neg_clip_loss(pool: Pool, seed: int, batch_size: int, draws: int, tau: float) -> np.ndarray:
    """negCLIPLoss of every pool row (NaN without embeddings) by explicit loops, normalised by log-mean-exp over
    the batch, the batches drawn by draw_batches with the filter's per-shard generator."""
    image, text = stored_vectors(pool, "m", "image_emb"), stored_vectors(pool, "m", "text_emb")
    out = np.full(len(image), np.nan)
    offset = 0
    for shard in pool.shard_ids():
        rows = [offset + i for i in range(pool.num_rows(shard)) if image[offset + i] is not None]
        partitions = ncl.draw_batches(len(rows), batch_size, draws, ncl.shard_rng(seed, shard))
        total = dict.fromkeys(rows, 0.0)
        for partition in partitions:
            for batch in partition:
                members = [rows[k] for k in batch]
                for i in members:
                    to_texts = np.array([image[i] @ text[j] for j in members]) / tau
                    to_images = np.array([image[j] @ text[i] for j in members]) / tau
                    loss = image[i] @ text[i] - tau / 2 * (
                        np.log(np.mean(np.exp(to_texts))) + np.log(np.mean(np.exp(to_images)))
                    )
                    total[i] += loss
        for i in rows:
            out[i] = total[i] / len(partitions)
        offset += pool.num_rows(shard)
    return out


def test_draw_batches_are_equal_partitions_seeded_by_shard() -> None:
    draws = ncl.draw_batches(23, 5, 3, ncl.shard_rng(0, "00000001"))
    assert len(draws) == 3
    for partition in draws:
        assert sorted(np.concatenate(partition).tolist()) == list(range(23))  # every row in exactly one batch
        assert len(partition) == 5 and {len(b) for b in partition} <= {4, 5}  # ceil(23 / 5), none above 5
    again = ncl.draw_batches(23, 5, 3, ncl.shard_rng(0, "00000001"))
    assert all(np.array_equal(a, b) for p, q in zip(draws, again) for a, b in zip(p, q))
    other = ncl.draw_batches(23, 5, 3, ncl.shard_rng(0, "00000002"))
    assert not np.array_equal(draws[0][0], other[0][0])
    (single,) = ncl.draw_batches(7, 10, 4, ncl.shard_rng(0, "x"))  # one batch holds all: one draw
    assert [b.tolist() for b in single] == [list(range(7))]


@pytest.mark.parametrize("batch_size,draws", [(6, 3), (100, 10)])
def test_neg_clip_loss_scores_match_brute_force(pair_pool, batch_size: int, draws: int) -> None:
    pool, missing = pair_pool
    expected = brute_neg_clip_loss(pool, 4, batch_size, draws, 0.01)
    got = np.concatenate(
        [
            ncl.shard_neg_clip_loss(
                "m", 0.01, batch_size, draws, 4, ShardData(pool, s), np.ones(pool.num_rows(s), bool)
            )
            for s in pool.shard_ids()
        ]
    )
    assert np.array_equal(np.isnan(got), missing)
    np.testing.assert_allclose(got[~missing], expected[~missing], rtol=0, atol=2e-6)
    pairs = zip(stored_vectors(pool, "m", "image_emb"), stored_vectors(pool, "m", "text_emb"))
    clip = np.array([np.nan if v is None else v @ t for v, t in pairs])
    assert np.abs(got - clip)[~missing].min() > 0.01  # not the CLIP score: the normalisation is there


def test_neg_clip_loss_batches_only_the_input_rows(pair_pool) -> None:
    pool, _ = pair_pool
    shard = pool.shard_ids()[0]
    rows = np.arange(pool.num_rows(shard)) % 3 != 0
    got = ncl.shard_neg_clip_loss("m", 0.05, 1000, 1, 0, ShardData(pool, shard), rows)
    image, text = stored_vectors(pool, "m", "image_emb"), stored_vectors(pool, "m", "text_emb")
    members = [i for i in np.flatnonzero(rows) if image[i] is not None]
    for i in range(len(rows)):
        if i not in members:
            assert np.isnan(got[i])
            continue
        row = np.log(sum(np.exp(image[i] @ text[j] / 0.05) for j in members) / len(members))
        col = np.log(sum(np.exp(image[j] @ text[i] / 0.05) for j in members) / len(members))
        assert got[i] == pytest.approx(image[i] @ text[i] - 0.05 / 2 * (row + col), abs=2e-6)


def test_neg_clip_loss_fraction_resumes_and_matches_the_rank_threshold(
    tmp_path: Path, pair_pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _ = pair_pool
    expected_scores = brute_neg_clip_loss(pool, 0, 8, 3, 0.3)  # at 0.01 many of these 8-d losses round to 0
    assert_well_separated(expected_scores)
    recipe = "steps: [{neg_clip_loss: {model_id: m, fraction: 0.3, batch_size: 8, batches: 3, temperature: 0.3}}]"
    scorer, calls = ncl.shard_neg_clip_loss, []

    def failing(*args):  # the first run dies on the third shard, after two score files are written
        calls.append(args[-2].shard)
        if args[-2].shard == pool.shard_ids()[2]:
            raise RuntimeError("killed")
        return scorer(*args)

    monkeypatch.setattr(ncl, "shard_neg_clip_loss", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run(pool, tmp_path, recipe)
    assert len(list((tmp_path / "r.work").glob("*/step-1.scores/*.npy"))) == 2
    calls.clear()
    monkeypatch.setattr(ncl, "shard_neg_clip_loss", lambda *args: calls.append(args[-2].shard) or scorer(*args))
    got = run(pool, tmp_path, recipe)
    assert calls == [pool.shard_ids()[2]]  # the re-run scored only the shard without a file
    assert got == kept_at(expected_scores, rank_threshold(expected_scores, 0.3))
    assert len(got) >= int(N * 0.3) + 1


def test_neg_clip_loss_threshold_and_parameters(tmp_path: Path, pair_pool) -> None:
    pool, _ = pair_pool
    scores = brute_neg_clip_loss(pool, 2, 32768, 10, 0.2)
    threshold = midway(scores, 0.5)
    got = run(
        pool,
        tmp_path,
        f"steps: [{{neg_clip_loss: {{model_id: m, threshold: {threshold}, temperature: 0.2, seed: 2}}}}]",
    )
    assert got == kept_at(scores, threshold)
    with pytest.raises(RecipeError, match="exactly one of 'threshold' and 'fraction'"):
        run(pool, tmp_path, "steps: [{neg_clip_loss: {model_id: m}}]", name="none")
    with pytest.raises(RecipeError, match="'temperature' must be > 0"):
        run(pool, tmp_path, "steps: [{neg_clip_loss: {model_id: m, fraction: 0.5, temperature: 0}}]", name="bad")


# --------------------------------------------------------------------------- norm_sim


@pytest.fixture
def target_npy(tmp_path: Path, pair_pool) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(5)
    pool, _ = pair_pool
    target = rng.normal(size=(12, D))
    target[0] = -np.array(stored_vectors(pool, "m", "image_emb")[7])  # row 7 is opposite a target: |.| counts
    path = tmp_path / "target.npy"
    np.save(path, target)
    return str(path), target / np.linalg.norm(target, axis=1, keepdims=True)


def brute_norm_sim(pool: Pool, target: np.ndarray, p: str) -> np.ndarray:
    out = []
    for v in stored_vectors(pool, "m", "image_emb"):
        if v is None:
            out.append(np.nan)
            continue
        sims = [abs(float(v @ u)) for u in target]
        out.append(max(sims) if p == "inf" else sum(s**2 for s in sims) ** 0.5)
    return np.array(out)


@pytest.mark.parametrize("p", ["2", "inf"])
def test_norm_sim_fraction_and_threshold_match_brute_force(tmp_path: Path, pair_pool, target_npy, p: str) -> None:
    pool, _ = pair_pool
    path, target = target_npy
    scores = brute_norm_sim(pool, target, p)
    assert_well_separated(scores)
    got = run(pool, tmp_path, f"steps: [{{norm_sim: {{model_id: m, target: {path}, p: '{p}', fraction: 0.25}}}}]")
    assert got == kept_at(scores, rank_threshold(scores, 0.25))
    if p == "inf":
        assert uid(7) in got  # its similarity to the target is -1: NormSim-inf is 1, the highest
    threshold = midway(scores, 0.6)
    got = run(
        pool,
        tmp_path,
        f"steps: [{{norm_sim: {{model_id: m, target: {path}, p: '{p}', threshold: {threshold}}}}}]",
        name="t",
    )
    assert got == kept_at(scores, threshold)


def test_norm_sim_refuses_a_target_holding_suite_images(tmp_path: Path, pair_pool) -> None:
    pool, _ = pair_pool
    images = [image_bytes((i * 9 % 256, 3 * i % 256, 11), (20 + i, 18)) for i in range(6)]
    target = build_pool(tmp_path / "target", [{"image": b} for b in images], per_shard=4)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, D))
    write_pair_model(target, "m", vectors, vectors, np.zeros(6, bool))
    suite = write_suite(tmp_path / "suite", [image_bytes((1, 2, 3)), images[4], image_bytes((4, 5, 6))])
    recipe = (
        "vars: {target: null, suite: null}\n"
        'steps: [{norm_sim: {model_id: m, target: "${target}", fraction: 0.5, suite: "${suite}"}}]'
    )
    with pytest.raises(RecipeError, match=rf"holds 1 test image.*uid {uid(4)}"):
        run(pool, tmp_path, recipe, target=str(tmp_path / "target"), suite=suite)
    clean = write_suite(tmp_path / "clean", [image_bytes((1, 2, 3)), image_bytes((4, 5, 6))])
    kept = run(pool, tmp_path, recipe, name="ok", target=str(tmp_path / "target"), suite=clean)
    assert len(kept) == N // 2 + 1  # no overlap: the step runs (rows down to rank N/2, 0-based)
    np.save(tmp_path / "t.npy", vectors)
    with pytest.raises(RecipeError, match="only a target pool can be checked"):
        run(pool, tmp_path, recipe, name="npy", target=str(tmp_path / "t.npy"), suite=clean)
    absent = tmp_path / "suite-without-data.yaml"
    absent.write_text("suite: absent\ntasks:\n  - {key: x, type: classification, metric: acc1, data: nothing/}\n")
    with pytest.raises(RecipeError, match="cannot be read"):
        run(pool, tmp_path, recipe, name="absent", target=str(tmp_path / "target"), suite=str(absent))


def write_suite(root: Path, images: list[bytes]) -> str:
    """A suite of one classification task, an image folder of two classes holding `images`."""
    for i, data in enumerate(images):
        folder = root / "data" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(data)
    suite = root / "suite.yaml"
    suite.write_text("suite: mini\ntasks:\n  - {key: mini/classes, type: classification, metric: acc1, data: data/}\n")
    return str(suite)


# --------------------------------------------------------------------------- external_score


def write_scores(path: Path, uids: list[str], scores: list[float | None], dtype: pa.DataType = pa.float64()) -> str:
    table = pa.table({"id": pa.array(uids, pa.string()), "value": pa.array(scores, dtype)})
    pq.write_table(table, path, row_group_size=9)  # several row groups: several map tasks
    return str(path)


@pytest.fixture
def external(tmp_path: Path) -> tuple[Pool, np.ndarray, str]:
    rng = np.random.default_rng(8)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    scores = rng.normal(size=N)
    scores[[5, 40]] = np.nan  # listed with a null score
    order = rng.permutation(N + 15)  # the file lists other uids too, in another order
    uids = [uid(n) if n < N else derive_uid(f"other/{n}") for n in order]
    values = [None if n < N and np.isnan(scores[n]) else float(scores[n]) if n < N else 9.0 for n in order]
    path = write_scores(
        tmp_path / "scores.parquet", [u.upper() if i % 4 == 0 else u for i, u in enumerate(uids)], values
    )
    return pool, scores, path


def external_recipe(path: str, cutoff: str, more: str = "") -> str:
    return (
        f"steps: [{{external_score: {{path: {path}, uid_column: id, score_column: value, {cutoff}, "
        f"budget_mb: 0.0005{more}}}}}]"
    )


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_external_score_fraction_is_the_rank_threshold(tmp_path: Path, external, fraction: float) -> None:
    pool, scores, path = external
    got = run(pool, tmp_path, external_recipe(path, f"fraction: {fraction}"))
    assert got == kept_at(scores, rank_threshold(scores, fraction))


def test_external_score_threshold_and_default_for_missing_uids(tmp_path: Path) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    listed = [n for n in range(N) if n % 7 != 2]  # rows 2, 9, 16, ... have no score in the file
    values = [np.float32(n / 100) for n in listed]
    path = write_scores(tmp_path / "s.parquet", [uid(n) for n in listed], values, pa.float32())
    assert float(np.float32(0.29)) < 0.29  # a stored float32 0.29 passes 0.29 only when compared as float32, as stored
    got = run(pool, tmp_path, external_recipe(path, "threshold: 0.29", ", missing: 0.5"))
    assert got == uids_of([n for n in listed if n >= 29] + [n for n in range(N) if n % 7 == 2])
    with pytest.raises(RecipeError) as err:
        run(pool, tmp_path, external_recipe(path, "threshold: 0.28"), name="strict")
    assert f"external_score {path}" in str(err.value)
    assert f"{len(range(2, N, 7))} input row(s)" in str(err.value)
    example = str(err.value).split("e.g. uid ")[1][:32]
    assert example in {uid(n) for n in range(2, N, 7)}
    # after a step that drops every unlisted row (their default score -5 is below -1), nothing is missing
    columns = f"path: {path}, uid_column: id, score_column: value"
    recipe = f"""steps:
      - external_score: {{{columns}, threshold: -1, missing: -5}}
      - external_score: {{{columns}, threshold: 0.28}}
    """
    assert run(pool, tmp_path, recipe, name="after") == uids_of(n for n in listed if n >= 28)


def test_external_score_refuses_repeated_uids_and_bad_columns(tmp_path: Path) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(N)], per_shard=PER_SHARD)
    uids = [uid(n) for n in range(N)] + [uid(12)]
    path = write_scores(tmp_path / "s.parquet", uids, [0.1] * (N + 1))
    with pytest.raises(RecipeError, match=rf"1 uid\(s\) have more than one row in the file \(e.g. {uid(12)}\)"):
        run(pool, tmp_path, external_recipe(path, "fraction: 0.5"))
    with pytest.raises(RecipeError, match=r"has no column 'uid' \(it has id, value\)"):
        run(pool, tmp_path, f"steps: [{{external_score: {{path: {path}, fraction: 0.5}}}}]", name="cols")
    with pytest.raises(RecipeError, match="'missing' must be error or a number"):
        run(pool, tmp_path, external_recipe(path, "fraction: 0.5", ", missing: zero"), name="m")


# --------------------------------------------------------------------------- shipped recipes


def test_shipped_recipes_select_the_top_30_percent(tmp_path: Path, pair_pool, target_npy) -> None:
    pool, _ = pair_pool
    path, target = target_npy
    scores = np.random.default_rng(1).normal(size=N)
    table = pa.table({"uid": [uid(n) for n in range(N)], "score": scores})
    pq.write_table(table, tmp_path / "mine.parquet")
    cases = [
        (
            "neg_clip_loss_30",
            {"model_id": "m", "batch_size": "8", "temperature": "0.3"},
            brute_neg_clip_loss(pool, 0, 8, 10, 0.3),
        ),
        ("norm_sim_2_30", {"model_id": "m", "target": path}, brute_norm_sim(pool, target, "2")),
        ("external_score_30", {"path": str(tmp_path / "mine.parquet")}, scores),
    ]
    for name, sets, expected in cases:
        out = str(tmp_path / f"{name}.npy")
        apply_recipe(pool.url, load_recipe(name, sets), out, workers=1)
        assert decode_uids(read_subset(out)) == kept_at(expected, rank_threshold(expected, 0.3)), name
