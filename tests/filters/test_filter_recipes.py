"""Recipes: shipped DataComp baselines, errors before any work, resuming, the synthetic pool, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsift import __version__
from clipsift.filters import base
from clipsift.filters.base import RecipeError
from clipsift.filters.recipe import apply_recipe, load_recipe, shipped_recipes
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool

from conftest import clipsift
from filter_support import build_pool, run, uids_of, write_model

BASELINES = [
    "no_filter",
    "basic_filter",
    "text_based",
    "image_based",
    "clip_score_l14_30pct",
    "clip_score_b32_30pct",
    "laion2b",
    "image_based_intersect_clip_score",
]


def test_every_datacomp_baseline_is_shipped_with_datacomps_parameters() -> None:
    assert set(BASELINES) <= set(shipped_recipes())
    leaves = {
        name: [n.filter for n in load_recipe(name, {"targets": "/t.npy"} if "image" in name else {}).leaves()]
        for name in BASELINES
    }
    (basic,) = leaves["basic_filter"]
    assert (basic.language, basic.min_words, basic.min_chars, basic.min_side, basic.max_aspect_ratio) == (
        "en",
        3,
        6,
        200,
        3.0,
    )
    (l14,) = leaves["clip_score_l14_30pct"]
    (b32,) = leaves["clip_score_b32_30pct"]
    assert (l14.model_id, l14.fraction, b32.model_id, b32.fraction) == (
        "ViT-L-14__openai",
        0.3,
        "ViT-B-32__openai",
        0.3,
    )
    caption, cluster = leaves["image_based"]
    assert (caption.language, caption.min_words, caption.min_chars) == ("en", 2, 6)
    assert (cluster.model_id, cluster.k, cluster.iterations, cluster.seed, cluster.targets) == (
        "ViT-L-14__openai",
        100_000,
        20,
        0,
        "/t.npy",
    )
    assert [f.name for f in leaves["image_based_intersect_clip_score"]] == ["caption", "image_cluster", "clip_score"]
    (laion,) = leaves["laion2b"]
    assert (laion.model_id, laion.threshold, laion.language) == ("ViT-B-32__openai", 0.28, "en")
    synth = load_recipe("synth_clip_score", {"model_id": "tiny__abc", "fraction": "0.25"}).leaves()[0].filter
    assert (synth.model_id, synth.fraction) == ("tiny__abc", 0.25)  # --set values are typed like YAML


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("steps: [blur_filter]", "step 1: unknown filter 'blur_filter'"),
        ("steps: [{basic: {min_word: 3}}]", "step 1 (basic): unknown parameter 'min_word'"),
        ("steps: [{basic: {min_words: three}}]", "parameter 'min_words' must be int"),
        ("steps: [{clip_score: {model_id: m, fraction: 1.5}}]", "parameter 'fraction' must be in [0, 1]"),
        ("steps: [{clip_score: {model_id: m}}]", "exactly one of 'threshold' and 'fraction'"),
        (
            "steps: [no_filter, {all: [basic, {dedup: {by: pixels}}]}]",
            "step 2.2 (dedup): parameter 'by' must be one of",
        ),
        ("steps: [{clip_score: {model_id: '${model}', threshold: 0.2}}]", "${model} is used but not declared"),
        (
            "vars: {model: null}\nsteps: [{clip_score: {model_id: '${model}', threshold: 0.2}}]",
            "variable 'model' has no value; pass --set model=...",
        ),
        ("steps: [{not: [basic, caption]}]", "(not): takes one step"),
    ],
)
def test_bad_recipes_are_refused_naming_the_step(tmp_path: Path, recipe: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_inputs_fail_before_any_work(tmp_path: Path, monkeypatch) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(12)], per_shard=5)
    write_model(pool, "m", np.full(12, 0.3, np.float32))
    write_model(pool, "full", np.full(12, 0.3, np.float32))
    (tmp_path / "pool" / "embeddings" / "m" / "00000002.parquet").unlink()
    calls = []
    monkeypatch.setattr(base.Filter, "prepare", lambda self, context: calls.append(self) or None)
    cases = [
        (
            "steps: [basic, {clip_score: {model_id: ViT-L-14__openai, fraction: 0.3}}]",
            "step 2 (clip_score): embeddings folder",
            "embeddings/ViT-L-14__openai does not exist (models scored: full, m)",
        ),
        (
            "steps: [{clip_score: {model_id: m, fraction: 0.3}}]",
            "step 1 (clip_score)",
            "lacks 1 of 3 shards (00000002)",
        ),
        (
            f"steps: [{{decontaminate: {{model_id: full, eval: {tmp_path}/nothing.npy}}}}]",
            "step 1 (decontaminate): eval",
            "does not exist",
        ),
        ("steps: [{text_based: {vocabulary: no-such-list.txt}}]", "step 1 (text_based)", "nor an existing text file"),
    ]
    for recipe, where, what in cases:
        (tmp_path / "r.yaml").write_text(recipe)
        with pytest.raises(RecipeError) as err:
            apply_recipe(pool.url, load_recipe(str(tmp_path / "r.yaml")), str(tmp_path / "out.npy"), workers=1)
        assert where in str(err.value) and what in str(err.value)
    assert calls == []  # no step started
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_embeddings_out_of_step_with_the_metadata_are_refused(tmp_path: Path) -> None:
    from clipsift.pipeline.pool import PoolFormatError, embeddings_schema

    pool = build_pool(tmp_path / "pool", [{} for _ in range(6)], per_shard=6)
    write_model(pool, "m", np.full(6, 0.3, np.float32))
    table = pool.embeddings("m", "00000000")
    pool.write_embeddings("m", "00000000", table.take([1, 0, 2, 3, 4, 5]).cast(embeddings_schema(8)))
    with pytest.raises(PoolFormatError, match="do not match the metadata of shard 00000000"):
        run(pool, tmp_path, "steps: [{clip_score: {model_id: m, fraction: 0.5}}]")


def test_killed_filter_run_resumes_without_redoing_finished_steps(tmp_path: Path, monkeypatch) -> None:
    from clipsift.filters.clip import ClipScore
    from clipsift.filters.metadata import Basic

    rng = np.random.default_rng(2)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(50)], per_shard=10)
    scores = rng.random(50).astype(np.float32)
    write_model(pool, "m", scores)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("steps: [basic, {clip_score: {model_id: m, fraction: 0.4}}]")
    expected = run(pool, tmp_path, recipe_path.read_text(), "clean")

    basic_calls, score_calls = [], []
    original_basic, original_score = Basic.keep, ClipScore.keep
    monkeypatch.setattr(Basic, "keep", lambda self, *a: basic_calls.append(a[1].shard) or original_basic(self, *a))

    def flaky(self, state, data, rows):
        score_calls.append(data.shard)
        if len(score_calls) == 3:
            raise KeyboardInterrupt("killed")
        return original_score(self, state, data, rows)

    monkeypatch.setattr(ClipScore, "keep", flaky)
    out = tmp_path / "subset.npy"
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(pool.url, load_recipe(str(recipe_path)), str(out), workers=1)
    assert not out.exists() and len(basic_calls) == 5
    apply_recipe(pool.url, load_recipe(str(recipe_path)), str(out), workers=1)
    assert len(basic_calls) == 5  # step 1 was not redone
    assert score_calls == ["00000000", "00000001", "00000002", "00000002", "00000003", "00000004"]
    assert decode_uids(read_subset(str(out))) == expected
    assert not (tmp_path / "subset.work").exists()


def test_subset_json_records_the_run(tmp_path: Path) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(8)], per_shard=5)
    run(pool, tmp_path, "name: everything\nsteps: [no_filter]", "s")
    info = json.loads((tmp_path / "s.json").read_text())
    assert (
        info["num_uids"] == 8 and info["recipe"]["name"] == "everything" and info["recipe"]["steps"] == ["no_filter"]
    )
    assert info["npy_sha256"] == hashlib.sha256((tmp_path / "s.npy").read_bytes()).hexdigest()
    assert info["pool_json_sha256"] == hashlib.sha256((tmp_path / "pool" / "pool.json").read_bytes()).hexdigest()
    assert info["clipsift_version"] == __version__ and info["created"].endswith("Z")
    assert info["steps"] == [{"path": "1", "label": "no_filter()", "rows_in": 8, "kept": 8}]


def test_basic_filter_on_the_synthetic_pool_against_its_truth(tmp_path: Path) -> None:
    from clipsift.pipeline.synth import synth_pool

    result = synth_pool(
        str(tmp_path / "pool"), num_samples=400, shard_size=100, truth=str(tmp_path / "truth.parquet"), workers=1
    )
    out = tmp_path / "basic.npy"
    apply_recipe(str(tmp_path / "pool"), load_recipe("basic_filter"), str(out), workers=1)
    kept = set(decode_uids(read_subset(str(out))))
    truth = pq.read_table(result.truth_path).to_pylist()

    def share_kept(kind: str) -> float:
        rows = [r for r in truth if r["kind"] == kind]
        assert rows, kind
        return sum(r["uid"] in kept for r in rows) / len(rows)

    assert share_kept("non_english") <= 0.1
    assert share_kept("small_or_extreme") <= 0.05
    assert share_kept("clean") >= 0.9
    removed = [r for r in truth if r["uid"] not in kept]
    noise_removed = sum(r["kind"] != "clean" for r in removed) / len(removed)
    assert noise_removed >= 0.85  # precision of what basic removes


def test_cli_filter_prints_each_step_and_subset_info(tmp_path: Path) -> None:
    pool = build_pool(
        tmp_path / "pool", [{"text": t} for t in ["a red circle on grey", "ein roter Kreis", "a cat"] * 3], per_shard=4
    )
    write_model(pool, "tiny__x", np.linspace(0.1, 0.9, 9).astype(np.float32))
    result = clipsift(
        "filter",
        pool.url,
        "--recipe",
        "synth_clip_score",
        "--set",
        "model_id=tiny__x",
        "--set",
        "fraction=0.5",
        "--out",
        str(tmp_path / "s.npy"),
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "clip_score(model_id='tiny__x', fraction=0.5)" in result.stderr and "(5 uids)" in result.stderr
    assert decode_uids(read_subset(str(tmp_path / "s.npy"))) == uids_of(range(4, 9))
    info = clipsift("subset", "info", str(tmp_path / "s.npy"))
    assert (
        info.returncode == 0
        and "uids" in info.stderr
        and hashlib.sha256((tmp_path / "s.npy").read_bytes()).hexdigest() in info.stderr
    )
    bad = clipsift(
        "filter", pool.url, "--recipe", "clip_score_l14_30pct", "--out", str(tmp_path / "t.npy"), "--workers", "1"
    )
    assert (
        bad.returncode == 2
        and "embeddings/ViT-L-14__openai does not exist" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    unset = clipsift(
        "filter", pool.url, "--recipe", "synth_clip_score", "--set", "modelid=x", "--out", str(tmp_path / "t.npy")
    )
    assert unset.returncode == 2 and "has no variable 'modelid'" in unset.stderr
    assert Pool(pool.url).info["num_samples"] == 9


def test_a_filter_that_writes_an_artifact_gets_it_named_made_and_recorded(tmp_path: Path, monkeypatch) -> None:
    """A filter defined here declares a file it writes; the runner names it, has it made before `prepare`, and
    subset.json records it like image_cluster's centroids, where the report finds it again (sha256 checked)."""
    from dataclasses import dataclass

    from clipsift.filters.registry import known_filters
    from clipsift.pipeline.report import ReportError, recorded_recipe

    known_filters()  # the shipped filters, before this test's one is registered
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))

    @base.register
    @dataclass
    class RowCount(base.Filter):
        name = "test_row_count"
        writes = (base.Artifact("row_counts", "counts", "counts.npy"),)
        counts: str | None = None  # .npy: [rows the step sees], written when missing

        def make_artifacts(self, context: base.Context) -> None:
            if not Path(self.counts).exists():
                np.save(self.counts, np.array([sum(int(rows.sum()) for _, rows in context.iter_data())]))

        def prepare(self, context: base.Context) -> int:
            return int(np.load(self.counts)[0])

        def keep(self, state: int, data: base.ShardData, rows: np.ndarray) -> np.ndarray:
            return rows

    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.3, 0.95, 0.55, 0.05, 0.65, 0.4], np.float32)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(12)], per_shard=5)
    write_model(pool, "m", scores)
    kept = run(pool, tmp_path, "steps: [{clip_score: {model_id: m, threshold: 0.5}}, test_row_count]", "s")
    assert kept == uids_of(np.flatnonzero(scores >= 0.5))
    counts = tmp_path / "s.counts.npy"
    assert np.load(counts).tolist() == [7]  # made from the rows step 2 saw
    info = json.loads((tmp_path / "s.json").read_text())
    assert info["row_counts"] == {
        "2": {"path": str(counts), "sha256": hashlib.sha256(counts.read_bytes()).hexdigest()}
    }
    assert info["centroids"] == {}  # as before: no image_cluster step
    assert info["steps"][1]["label"] == f"test_row_count(counts={str(counts)!r})"

    assert recorded_recipe(info, str(tmp_path / "s.json")).leaves()[1].filter.counts == str(counts)
    del info["row_counts"]["2"]
    with pytest.raises(ReportError, match=r"step 2 \(test_row_count\) has no row_counts file recorded"):
        recorded_recipe(info, str(tmp_path / "s.json"))
    np.save(counts, np.array([6]))
    info = json.loads((tmp_path / "s.json").read_text())
    with pytest.raises(ReportError, match=r"step 2 \(test_row_count\): row_counts file .* changed since"):
        recorded_recipe(info, str(tmp_path / "s.json"))

    (tmp_path / "two.yaml").write_text("steps: [test_row_count, {not: test_row_count}]")
    with pytest.raises(RecipeError, match=r"steps 1, 2.1 are test_row_count steps without a `counts:` file"):
        apply_recipe(pool.url, load_recipe(str(tmp_path / "two.yaml")), str(tmp_path / "two.npy"), workers=1)
    monkeypatch.setattr(RowCount, "make_artifacts", lambda self, context: None)
    with pytest.raises(RecipeError, match=r"step 1 \(test_row_count\): wrote no row_counts file"):
        run(pool, tmp_path, "steps: [test_row_count]", "none")


def test_importing_the_filter_base_imports_no_filter_module() -> None:
    import subprocess
    import sys

    def loaded(imports: str) -> list[str]:
        code = f"import sys; {imports}; print(*sorted(m for m in sys.modules if m.startswith('clipsift.filters.')))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()

    assert loaded("import clipsift.filters.base") == ["clipsift.filters.base"]
    registered = loaded(
        "from clipsift.filters.registry import known_filters; assert 'image_cluster' in known_filters()"
    )
    modules = ("base", "clip", "cluster", "dedup", "metadata", "registry")
    assert {f"clipsift.filters.{m}" for m in modules} <= set(registered)


@pytest.mark.parametrize("share", [10, 30, 50])
def test_shipped_random_recipes_keep_their_exact_share_for_a_seed(tmp_path: Path, share: int) -> None:
    pool = build_pool(tmp_path / "pool", [{} for _ in range(90)], per_shard=20)

    def subset(seed: int | None) -> list[str]:
        out = str(tmp_path / f"random-{share}-{seed}.npy")
        sets = {} if seed is None else {"seed": str(seed)}
        apply_recipe(pool.url, load_recipe(f"random_{share}", sets), out, workers=1)
        return decode_uids(read_subset(out))

    first = subset(None)
    assert len(first) == round(share / 100 * 90) and set(first) <= set(uids_of(range(90)))
    assert subset(0) == first and subset(1) != first  # the default seed is 0; another seed draws another subset


NEW_RECIPES = {  # the issue-21 recipes and the --set values a synthetic pool scored by model "m" needs
    "neg_clip_loss_30": {"model_id": "m", "temperature": "0.05", "batch_size": "64"},
    "norm_sim_2_30": {"model_id": "m", "target": "{tmp}/target.npy"},
    "external_score_30": {"path": "{tmp}/external.parquet"},
    "balance_suite": {"suite": "tiny", "suite_data": "{tmp}/tiny-suite", "t": "3"},
    "caption_quality": {},
    "image_quality": {},
    "semdedup": {"model_id": "m"},
    "weight_clip_score": {"model_id": "m"},
}


def test_every_new_shipped_recipe_runs_on_the_synthetic_pool(tmp_path: Path) -> None:
    """Each shipped issue-21 recipe, by name with --set values only, on a synthetic pool with images: a subset that
    keeps some rows and drops others, recorded under the recipe's name (the filters' numbers are tested against
    brute force in their own test files)."""
    import pyarrow as pa

    from clipsift.eval.tiny import make_tiny_suite
    from clipsift.pipeline.synth import synth_pool

    synth_pool(str(tmp_path / "pool"), num_samples=300, shard_size=100, workers=1)
    make_tiny_suite(str(tmp_path / "tiny-suite"))  # balance_suite's class names
    pool = Pool(str(tmp_path / "pool"))
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    vectors[1::7] = vectors[::7][: len(vectors[1::7])] + 0.01  # near duplicates for semdedup
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_model(pool, "m", rng.uniform(0.1, 0.4, 300).astype(np.float32), vectors)
    np.save(tmp_path / "target.npy", vectors[:5])
    pq.write_table(pa.table({"uid": pool.uids(), "score": rng.uniform(size=300)}), tmp_path / "external.parquet")
    for name, sets in NEW_RECIPES.items():
        assert name in shipped_recipes()
        values = {key: value.format(tmp=tmp_path) for key, value in sets.items()}
        out = tmp_path / f"{name}.npy"
        apply_recipe(pool.url, load_recipe(name, values), str(out), workers=1)
        kept = set(decode_uids(read_subset(str(out))))
        assert 0 < len(kept) < 300, (name, len(kept))
        assert json.loads(out.with_suffix(".json").read_text())["recipe"]["name"] == name
