"""image_quality (cached per-shard image statistics) and semdedup (SemDeDup within k-means clusters): each against
an independent brute-force computation, through the recipe runner, with the cache reused and a killed run resumed."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from clipsift.filters import image_quality, semdedup
from clipsift.filters.base import Context, Inputs, RecipeError, ShardData
from clipsift.filters.recipe import load_recipe
from clipsift.filters.semdedup import SemDedup
from clipsift.pipeline.pool import (
    Pool,
    Sample,
    derive_uid,
    embeddings_schema,
    finalize_pool,
    write_metadata,
    write_shard,
)
from clipsift.pipeline.pool.columns import COLUMN_SET_KEY

from filter_support import build_pool, run, uids_of

# --------------------------------------------------------------------------- image_quality


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_images() -> dict[str, bytes]:
    """Images 320x256 (already at the working size, so no resampling comes between them and the oracle)."""
    rng = np.random.default_rng(3)
    sharp = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(3)))
    ramp = np.repeat(np.linspace(0, 255, 320)[None, :, None], 256, axis=0).repeat(3, axis=2)
    return {
        "sharp": png(sharp),
        "blurred": png(blurred),
        "flat": png(np.broadcast_to(np.array([90, 140, 200], np.uint8), (256, 320, 3))),
        "dark": png(rng.integers(0, 40, (256, 320, 3))),
        "bright": png(rng.integers(215, 256, (256, 320, 3))),
        "ramp": png(ramp),
        "broken": b"this is not an image",
    }


def oracle_stats(data: bytes) -> tuple[float, float, float, float]:
    """(blur, entropy, std, brightness) by numpy and scipy: luma by the ITU-R 601-2 formula in float, rounded;
    scipy's Laplacian (the same 5-point kernel) on the interior; entropy from np.unique's counts."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
    grey = np.floor(rgb @ np.array([0.299, 0.587, 0.114]) + 0.5)
    laplacian = ndimage.laplace(grey)[1:-1, 1:-1]
    _, counts = np.unique(grey, return_counts=True)
    p = counts / counts.sum()
    return float(laplacian.var()), float(-np.sum(p * np.log2(p))), float(grey.std()), float(grey.mean())


@pytest.fixture
def image_pool(tmp_path: Path) -> tuple[Pool, list[str]]:
    """Two shards holding every test image twice (14 rows); returns the pool and each row's image name."""
    images = sample_images()
    names = [*images, *images]
    pool = build_pool(tmp_path / "pool", [{"image": images[name]} for name in names], per_shard=8)
    return pool, names


def stored(pool: Pool) -> pa.Table:
    columns = image_quality.column_set(pool)
    return pa.concat_tables(pq.read_table(columns.path(s)) for s in pool.shard_ids())


def test_image_quality_columns_equal_an_independent_computation(image_pool) -> None:
    pool, names = image_pool
    columns, computed = image_quality.precompute(pool, workers=1)
    assert computed == pool.shard_ids() == ["00000000", "00000001"]
    table = stored(pool)
    assert table.column("uid").to_pylist() == [
        u for s in pool.shard_ids() for u in pool.metadata(s)["uid"].to_pylist()
    ]
    images = sample_images()
    for row, name in enumerate(names):
        got = [table.column(c)[row].as_py() for c in image_quality.COLUMNS]
        status = table.column("status")[row].as_py()
        if name == "broken":
            assert np.isnan(got).all() and "undecodable image" in status
            continue
        assert status == "ok"
        want = oracle_stats(images[name])
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=name)
    by_name = {name: [table.column(c)[i].as_py() for c in image_quality.COLUMNS] for i, name in enumerate(names)}
    assert by_name["sharp"][0] > 20 * by_name["blurred"][0]  # blurring removes most of the Laplacian's variance
    assert by_name["flat"][:3] == [0.0, 0.0, 0.0]
    assert by_name["flat"][3] == pytest.approx(0.299 * 90 + 0.587 * 140 + 0.114 * 200, abs=0.5)
    assert by_name["dark"][3] < 40 < 215 < by_name["bright"][3]
    assert by_name["ramp"][1] > 7.9  # 256 evenly used levels: 8 bits
    stamp = pq.read_schema(columns.path("00000000")).metadata[COLUMN_SET_KEY]
    assert b'"version": 1' in stamp and b'"working_side": 256' in stamp


def test_working_image_is_the_middle_at_256_px_on_its_shorter_side() -> None:
    def shape(width: int, height: int) -> tuple[int, int]:
        return image_quality.working_grey(Image.new("RGB", (width, height))).shape

    assert shape(320, 256) == (256, 320)
    assert shape(700, 500) == (256, 358)  # shrunk: 700 * 256 / 500 = 358.4
    assert shape(40, 50) == (320, 256)  # enlarged
    assert shape(1000, 100) == (256, 1024)  # aspect 10: the middle 400 x 100 kept
    assert shape(100, 1000) == (1024, 256)
    wide = np.zeros((100, 1000, 3), np.uint8)
    wide[:, 300:700] = 255  # only the middle 400 columns are white: they are all the working image holds
    grey = image_quality.working_grey(Image.fromarray(wide))
    assert grey[:, 8:-8].min() == 255 and grey.mean() > 240


def test_image_quality_thresholds_through_the_recipe_runner(image_pool, tmp_path: Path) -> None:
    pool, names = image_pool
    stats = {name: oracle_stats(data) for name, data in sample_images().items() if name != "broken"}
    bounds = {"min_blur": 50.0, "min_entropy": 3.0, "min_std": 10.0, "min_brightness": 30.0, "max_brightness": 200.0}
    expected = [
        row
        for row, name in enumerate(names)
        if name != "broken"
        and stats[name][0] >= 50
        and stats[name][1] >= 3
        and stats[name][2] >= 10
        and 30 <= stats[name][3] <= 200
    ]
    assert {names[row] for row in expected} == {"sharp"}  # each other image fails one bound
    params = ", ".join(f"{key}: {value}" for key, value in bounds.items())
    assert run(pool, tmp_path, f"steps: [{{image_quality: {{{params}}}}}]", "all") == uids_of(expected)
    dark_only = [row for row, name in enumerate(names) if name == "dark"]
    got = run(pool, tmp_path, "steps: [{image_quality: {max_brightness: 40, min_std: 1}}]", "dark")
    assert got == uids_of(dark_only)
    blur_only = [row for row, name in enumerate(names) if name in ("sharp", "blurred", "dark", "bright")]
    assert run(pool, tmp_path, "steps: [{image_quality: {min_blur: 1}}]", "blur") == uids_of(blur_only)


def test_image_quality_is_computed_once_and_again_after_a_change_of_definition(
    image_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, names = image_pool
    stats = {name: oracle_stats(data) for name, data in sample_images().items() if name != "broken"}
    calls: list[str] = []
    real = image_quality.compute_shard
    monkeypatch.setattr(image_quality, "compute_shard", lambda p, c, shard: calls.append(shard) or real(p, c, shard))
    first = run(pool, tmp_path, "steps: [{image_quality: {min_std: 10}}]", "first")
    assert calls == ["00000000", "00000001"]
    paths = [Path(image_quality.column_set(pool).path(s)) for s in pool.shard_ids()]
    stamps = [p.stat().st_mtime_ns for p in paths]
    second = run(pool, tmp_path, "steps: [{image_quality: {min_blur: 50}}]", "second")
    assert calls == ["00000000", "00000001"]  # the second recipe read the files
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert first == uids_of(row for row, name in enumerate(names) if name in stats and stats[name][2] >= 10)
    assert second == uids_of(row for row, name in enumerate(names) if name in stats and stats[name][0] >= 50)
    assert (len(first), len(second)) == (4, 6)  # sharp and ramp; sharp, dark and bright (two copies each)

    paths[1].unlink()  # a lost file: only its shard is computed again
    run(pool, tmp_path, "steps: [{image_quality: {min_blur: 50}}]", "lost")
    assert calls == ["00000000", "00000001", "00000001"]

    monkeypatch.setattr(image_quality, "VERSION", image_quality.VERSION + 1)  # a new definition: every file is stale
    assert run(pool, tmp_path, "steps: [{image_quality: {min_std: 10}}]", "new") == first
    assert calls[3:] == ["00000000", "00000001"]
    assert all(b'"version": 2' in pq.read_schema(p).metadata[COLUMN_SET_KEY] for p in paths)

    elsewhere = tmp_path / "columns"  # `folder`: a column set outside the pool
    assert run(pool, tmp_path, f"steps: [{{image_quality: {{min_std: 10, folder: {elsewhere}}}}}]", "away") == first
    assert sorted(p.name for p in elsewhere.iterdir()) == ["00000000.parquet", "00000001.parquet"]


def images_pool(root: Path, names: list[str], prefix: str) -> Pool:
    """The test images `names`, 8 a shard, row n with uid derive_uid(f"{prefix}/{n}") (over any pool at `root`)."""
    images = sample_images()
    for index, start in enumerate(range(0, len(names), 8)):
        rows = range(start, min(start + 8, len(names)))
        write_shard(
            str(root), index, [Sample(derive_uid(f"{prefix}/{n}"), images[names[n]], "png", "x") for n in rows]
        )
    finalize_pool(str(root), "test", [])
    return Pool(str(root))


def test_image_quality_recomputes_files_made_for_other_uids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file computed for other rows of the same count (a pool rebuilt in place, a folder two pools share) is
    stale: computed again, not a failure when `keep` meets it."""
    stats = {name: oracle_stats(data) for name, data in sample_images().items() if name != "broken"}
    names = [*sample_images(), *sample_images()]
    contrast = [n for n, name in enumerate(names) if name in stats and stats[name][2] >= 10]
    calls: list[str] = []
    real = image_quality.compute_shard
    monkeypatch.setattr(image_quality, "compute_shard", lambda p, c, shard: calls.append(shard) or real(p, c, shard))

    def kept(pool: Pool, prefix: str, name: str, more: str = "") -> bool:
        got = run(pool, tmp_path, f"steps: [{{image_quality: {{min_std: 10{more}}}}}]", name)
        return got == sorted(derive_uid(f"{prefix}/{n}") for n in contrast)

    pool = images_pool(tmp_path / "pool", names, "a")
    assert kept(pool, "a", "first") and calls == ["00000000", "00000001"]
    pool = images_pool(tmp_path / "pool", names, "b")  # rebuilt in place: the same shard sizes, other uids
    assert kept(pool, "b", "rebuilt") and calls[2:] == ["00000000", "00000001"]
    assert kept(pool, "b", "again") and len(calls) == 4  # now fresh

    shared = f", folder: {tmp_path / 'shared'}"
    other = images_pool(tmp_path / "other", names, "c")
    assert kept(pool, "b", "shared-b", shared) and kept(other, "c", "shared-c", shared)
    assert calls[4:] == ["00000000", "00000001"] * 2  # the second pool's rows are not the first's
    stamp = json.loads(pq.read_schema(tmp_path / "shared" / "00000001.parquet").metadata[COLUMN_SET_KEY])
    uids = [derive_uid(f"c/{n}") for n in range(8, len(names))]
    assert stamp["uids"] == hashlib.sha256("\n".join(uids).encode()).hexdigest()


def refused(tmp_path: Path, name: str, cases: list[tuple[str, str]]) -> None:
    """Each recipe step `{name: params}` is refused when the recipe is loaded, with the message given."""
    for params, message in cases:
        (tmp_path / "r.yaml").write_text(f"steps: [{{{name}: {params}}}]")
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(str(tmp_path / "r.yaml"))


def test_image_quality_refuses_bad_bounds_and_a_pool_without_images(tmp_path: Path) -> None:
    refused(
        tmp_path,
        "image_quality",
        [
            ("{}", "give at least one of min_blur"),
            ("{min_entropy: 9}", "in [0, 8]"),
            ("{min_brightness: 200, max_brightness: 100}", "min_brightness is above max_brightness"),
        ],
    )
    pool = vector_pool(tmp_path / "bare", np.eye(4, dtype=np.float32), np.zeros(4, bool), [4])
    with pytest.raises(RecipeError, match="has no tar .*a metadata-only pool cannot use it"):
        run(pool, tmp_path, "steps: [{image_quality: {min_std: 1}}]", "bare")


# --------------------------------------------------------------------------- semdedup

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def uid(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def vector_pool(root: Path, vectors: np.ndarray, missing: np.ndarray, sizes: list[int]) -> Pool:
    """A metadata-only pool (uid i = md5 of i) with image embeddings of model `m` (rows in `missing` have none)."""
    start = 0
    for index, size in enumerate(sizes):
        rows = slice(start, start + size)
        uids = [uid(i) for i in range(start, start + size)]
        table = pa.table(
            {
                "uid": uids,
                "key": [f"{index:08d}_{i:08d}" for i in range(size)],
                "text": ["a cat"] * size,
                "url": pa.array([None] * size, pa.string()),
                "original_width": pa.array([300] * size, pa.int32()),
                "original_height": pa.array([300] * size, pa.int32()),
                "sha256": pa.array([None] * size, pa.string()),
            }
        )
        write_metadata(str(root), index, table)
        emb = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors[rows].astype(np.float16).ravel()), vectors.shape[1], mask=pa.array(missing[rows])
        )
        status = ["no image" if m else "ok" for m in missing[rows]]
        scores = pa.array(np.full(size, 0.3, np.float32), mask=missing[rows])
        schema = embeddings_schema(vectors.shape[1])
        embeddings = pa.table([pa.array(uids), emb, emb, scores, pa.array(status)], schema=schema)
        Pool(str(root)).write_embeddings("m", f"{index:08d}", embeddings)
        start += size
    finalize_pool(str(root), "test", [])
    return Pool(str(root))


def planted(seed: int = 7, n: int = 900) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, missing): n unit vectors around 12 topics, with planted near copies (cosine 0.96-0.995) of other
    rows, exact copies (ties for `central`), and chains a ~ b ~ c whose ends are at cosine 0.97^2 = 0.941 (not
    duplicates at 0.95); 6 rows without an embedding."""
    rng = np.random.default_rng(seed)
    topics = unit(rng.normal(size=(12, DIM)))
    vectors = unit(topics[rng.integers(0, 12, n)] + rng.normal(size=(n, DIM)) / np.sqrt(DIM) * 1.2)
    slots = iter(rng.permutation(n))

    def near(source: np.ndarray, cosine: float, away_from: np.ndarray | None = None) -> np.ndarray:
        noise = rng.normal(size=DIM)
        for axis in [source] + ([away_from] if away_from is not None else []):
            noise -= (noise @ axis) * axis
        return cosine * source + np.sqrt(1 - cosine**2) * unit(noise)

    for _ in range(60):
        vectors[next(slots)] = near(vectors[rng.integers(0, n)], rng.uniform(0.96, 0.995))
    for _ in range(12):
        vectors[next(slots)] = vectors[rng.integers(0, n)]
    for _ in range(10):
        a = vectors[next(slots)]
        b = near(a, 0.97)
        vectors[next(slots)] = b
        vectors[next(slots)] = near(b, 0.97, away_from=unit(a - (a @ b) * b))
    missing = np.zeros(n, bool)
    missing[[next(slots) for _ in range(6)]] = True
    return unit(vectors).astype(np.float32), missing


def oracle_kept(vectors: np.ndarray, missing: np.ndarray, centroids: np.ndarray, threshold: float, keep: str):
    """Rows SemDeDup keeps, by brute force: each stored (float16) vector to its nearest centroid by a numpy argmax,
    then within each cluster, in the keep order, a row goes when any row before it is at cosine >= threshold."""
    stored = vectors.astype(np.float16).astype(np.float32)
    nearest = np.argmax(stored @ centroids.T, axis=1)
    removed = set()
    for cluster in np.unique(nearest[~missing]):
        members = [i for i in range(len(stored)) if nearest[i] == cluster and not missing[i]]
        if keep != "first":
            sign = -1.0 if keep == "central" else 1.0
            members.sort(key=lambda i: (sign * float(stored[i] @ centroids[cluster]), i))
        for place, j in enumerate(members):
            if any(float(stored[i] @ stored[j]) >= threshold for i in members[:place]):
                removed.add(j)
    return [i for i in range(len(stored)) if i not in removed]


@pytest.fixture
def planted_pool(tmp_path: Path) -> tuple[Pool, np.ndarray, np.ndarray]:
    vectors, missing = planted()
    return vector_pool(tmp_path / "near", vectors, missing, [200, 150, 250, 1, 299]), vectors, missing


def kept_rows(pool: Pool, step: SemDedup, state) -> list[int]:
    masks = [step.keep(state, ShardData(pool, s), np.ones(pool.num_rows(s), bool)) for s in pool.shard_ids()]
    return np.flatnonzero(np.concatenate(masks)).tolist()


def read_plan(folder: Path) -> np.lib.npyio.NpzFile:
    return np.load(folder / "plan.npz")


def test_semdedup_equals_brute_force_within_the_steps_clusters(
    planted_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, vectors, missing = planted_pool
    monkeypatch.setattr(semdedup, "BLOCK_ENTRIES", 300)  # similarities in blocks of a few rows
    results = {}
    steps = {keep: SemDedup(model_id="m", eps=0.05, which_to_keep=keep, budget_mb=0.005) for keep in semdedup.KEEPS}
    # a threshold for eps, 20 clusters fitted on a third of the rows, one partition
    steps["sampled"] = SemDedup(model_id="m", threshold=0.95, which_to_keep="central", k=20, sample_rate=0.33)
    for name, step in steps.items():
        workdir = tmp_path / f"step-{name}"
        state = step.prepare(Context(pool, Inputs(pool), str(workdir), workers=1))
        plan = read_plan(Path(f"{workdir}.dedup"))
        assert int(plan["partitions"]) > 3 if name != "sampled" else len(plan["centroids"]) == 20
        results[name] = kept_rows(pool, step, state)
        assert results[name] == oracle_kept(vectors, missing, plan["centroids"], 0.95, step.which_to_keep), name
    first, central, farthest = results["first"], results["central"], results["farthest"]
    assert 780 < len(first) < 860  # about 90 planted duplicates removed
    assert set(np.flatnonzero(missing)) <= set(first)  # rows without an embedding stay
    assert len({tuple(first), tuple(central), tuple(farthest)}) == 3  # the order decides which copy stays


def test_semdedup_keeps_the_chains_middle_out_depending_on_order() -> None:
    """The rule is SemDeDup's, not connected components: in a ~ b ~ c (a, c apart), b goes whenever a row of its
    group comes first, and c stays when b comes after it."""
    a = np.eye(4, dtype=np.float32)[0]
    b = unit(0.97 * a + 0.243 * np.eye(4, dtype=np.float32)[1])
    c = unit(0.97 * b + 0.243 * unit(np.array([-0.243, 0.97, 0, 0], np.float32)))
    assert b @ a > 0.95 and c @ b > 0.95 and c @ a < 0.95
    assert semdedup.has_earlier_duplicate(np.stack([a, b, c]), 0.95).tolist() == [False, True, True]
    assert semdedup.has_earlier_duplicate(np.stack([a, c, b]), 0.95).tolist() == [False, False, True]


def test_semdedup_through_the_recipe_runner_resumes_after_a_kill(
    planted_pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, vectors, missing = planted_pool
    recipe = "steps: [{semdedup: {model_id: m, threshold: 0.95, which_to_keep: central, seed: 3, budget_mb: 0.005}}]"
    reduced: list[int] = []
    real = semdedup._SemDedupReduce.__call__

    def killed(self, partition: int, table: pa.Table):
        if partition == 2:
            raise KeyboardInterrupt  # killed in the middle of the reduce pass
        reduced.append(partition)
        return real(self, partition, table)

    monkeypatch.setattr(semdedup._SemDedupReduce, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        run(pool, tmp_path, recipe, "s")
    assert reduced == [0, 1]
    (folder,) = (tmp_path / "s.work").glob("*/step-1.dedup")
    centroids = read_plan(folder)["centroids"]  # the centroids the step uses, kept for the re-run
    monkeypatch.setattr(semdedup._SemDedupReduce, "__call__", lambda self, p, t: reduced.append(p) or real(self, p, t))
    got = run(pool, tmp_path, recipe, "s")
    assert reduced[:3] == [0, 1, 2]  # the re-run started with the partition the kill stopped
    assert got == sorted(uid(i) for i in oracle_kept(vectors, missing, centroids, 0.95, "central"))
    assert not (tmp_path / "s.work").exists()


def test_semdedup_parameters_are_checked(tmp_path: Path) -> None:
    refused(
        tmp_path,
        "semdedup",
        [
            ("{model_id: m}", "exactly one of 'eps'"),
            ("{model_id: m, eps: 0.1, threshold: 0.9}", "exactly one of 'eps'"),
            (
                "{model_id: m, eps: 0.1, which_to_keep: last}",
                "'which_to_keep' must be one of first, central, farthest",
            ),
            ("{model_id: m, eps: 0.1, sample_rate: 0}", "'sample_rate' must be in"),
            ("{model_id: m, eps: 0}", "'eps' must be > 0, got 0.0: embeddings are stored as float16"),
            ("{model_id: m, eps: -0.1}", "'eps' must be > 0"),
            ("{model_id: m, eps: 2.5}", "'eps' must be at most 2"),
            ("{model_id: m, threshold: 1}", "'threshold' (cosine) must be below 1, got 1.0: embeddings are stored"),
            ("{model_id: m, threshold: -1.5}", "'threshold' (cosine) must be at least -1"),
        ],
    )
    # why: unit vectors stored as float16 often have a cosine below 1 with an exact copy of themselves
    vectors = np.random.default_rng(0).normal(size=(200, 64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rounded = vectors.astype(np.float16).astype(np.float32)
    assert 0.2 < np.mean(np.einsum("ij,ij->i", rounded, rounded) < np.float32(1.0)) < 0.8
    shipped = load_recipe("semdedup", {"model_id": "tiny__ab"}).leaves()[0].filter
    assert (shipped.model_id, shipped.cosine, shipped.which_to_keep) == ("tiny__ab", pytest.approx(0.95), "first")


def test_pool_columns_command_computes_only_what_is_missing(image_pool) -> None:
    from typer.testing import CliRunner

    from clipsift.cli import app

    pool, _ = image_pool
    first = CliRunner().invoke(app, ["pool", "columns", "image_quality", pool.url, "--workers", "1"])
    assert first.exit_code == 0, first.output
    assert re.search(r"shards computed\s+2", first.output) and re.search(r"shards reused\s+0", first.output)
    assert stored(pool).num_rows == 14
    again = CliRunner().invoke(app, ["pool", "columns", "image_quality", pool.url, "--workers", "1"])
    assert re.search(r"shards computed\s+0", again.output) and re.search(r"shards reused\s+2", again.output)
    unknown = CliRunner().invoke(app, ["pool", "columns", "sharpness", pool.url])
    assert unknown.exit_code != 0 and "unknown column set 'sharpness'; known: image_quality" in str(unknown.exception)
