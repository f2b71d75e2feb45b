"""`clipsift report`: the curation report's numbers against independent computations, in Chromium, from a run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipsift.filters.recipe import apply_recipe, load_recipe
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.report import ReportError, curation_report
from clipsift.pipeline.synth import synth_pool

from filter_support import write_model

FRACTION, MIN_WORDS, SAMPLES = 0.25, 4, 6  # FRACTION under the pool's clean share (28%)
RECIPE = """name: report_test
steps:
  - clip_score: {{model_id: m, fraction: {fraction}}}
  - image_cluster: {{model_id: m, targets: {targets}, k: 8, iterations: 10}}
  - caption: {{language: null, min_words: {min_words}}}
"""


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 512-sample synthetic pool with its truth, embeddings where clean samples score higher and sit in
    their own clusters, filtered (from its folder, with relative paths) by clip_score -> image_cluster -> caption."""
    root = tmp_path_factory.mktemp("report")
    synth_pool(str(root / "pool"), num_samples=512, shard_size=200, truth=str(root / "truth.parquet"), workers=1)
    pool = Pool(str(root / "pool"))
    kinds = dict(zip(*pq.read_table(root / "truth.parquet", columns=["uid", "kind"]).to_pydict().values()))
    uids = pool.uids().to_pylist()
    clean = np.array([kinds[u] == "clean" for u in uids])
    rng = np.random.default_rng(0)
    scores = np.where(clean, rng.normal(0.3, 0.03, len(uids)), rng.normal(0.2, 0.05, len(uids))).astype(np.float32)
    centres = np.eye(8, dtype=np.float32)
    vectors = centres[np.where(clean, rng.integers(0, 4, len(uids)), rng.integers(4, 8, len(uids)))]
    write_model(pool, "m", scores, vectors + rng.normal(0, 0.1, vectors.shape).astype(np.float32))
    np.save(root / "reference.npy", centres[rng.integers(0, 4, 64)] + rng.normal(0, 0.1, (64, 8)).astype(np.float32))
    (root / "recipe.yaml").write_text(
        RECIPE.format(fraction=FRACTION, targets=root / "reference.npy", min_words=MIN_WORDS)
    )
    here = os.getcwd()
    os.chdir(root)
    try:  # subset.json records the pool and the centroids relative to this folder
        apply_recipe("pool", load_recipe("recipe.yaml"), "subset.npy", workers=1)
    finally:
        os.chdir(here)
    texts = dict(zip(uids, pool_texts(pool)))
    return {
        "root": root,
        "subset": str(root / "subset.npy"),
        "truth": str(root / "truth.parquet"),
        "uids": uids,
        "scores": dict(zip(uids, scores.tolist())),
        "kinds": kinds,
        "texts": texts,
        "kept": set(decode_uids(read_subset(str(root / "subset.npy")))),
    }


def pool_texts(pool: Pool) -> list[str]:
    return [t for s in pool.shard_ids() for t in pool.metadata(s, ["text"]).column("text").to_pylist()]


@pytest.fixture(scope="module")
def report(filtered: dict) -> tuple:
    out = filtered["root"] / "report" / "report.html"
    result = curation_report(filtered["subset"], str(out), truth=filtered["truth"], samples=SAMPLES, seed=1)
    return result, out.read_text(encoding="utf-8")


def gallery(page: str, name: str) -> list[str]:
    match = re.search(rf'data-gallery="{re.escape(name)}">(.*?)</div>', page)
    assert match, name
    return re.findall(r'data-uid="([0-9a-f]{32})"', match.group(1))


def test_steps_threshold_and_truth_numbers(filtered: dict, report: tuple) -> None:
    result, page = report
    info = json.loads((filtered["root"] / "subset.json").read_text())
    steps = [
        {"path": p, "rows_in": int(i), "kept": int(k)}
        for p, i, k in re.findall(r'data-step="([\d.]+)" data-rows-in="(\d+)" data-kept="(\d+)"', page)
    ]
    assert steps == [{key: s[key] for key in ("path", "rows_in", "kept")} for s in info["steps"]] and len(steps) == 3
    assert 'id="pool-size" data-value="512"' in page and f'data-kept="{len(filtered["kept"])}"' in page

    # DataComp's threshold: the score at rank int(N * fraction) of all rows sorted descending
    scores = np.array([filtered["scores"][u] for u in filtered["uids"]], np.float32)
    threshold = float(np.sort(scores)[::-1][int(len(scores) * FRACTION)])
    shown = re.search(r'class="threshold" data-step="1" data-value="([^"]+)"', page).group(1)
    assert float(shown) == threshold == result.thresholds["1"]

    kinds, kept = filtered["kinds"], filtered["kept"]
    for kind in set(kinds.values()):
        members = [u for u in filtered["uids"] if kinds[u] == kind]
        survivors = sum(u in kept for u in members)
        row = re.search(rf'data-kind="{kind}" data-pool="(\d+)" data-kept="(\d+)" data-removed-share="([^"]+)"', page)
        assert (int(row.group(1)), int(row.group(2))) == (len(members), survivors)
        assert float(row.group(3)) == pytest.approx(1 - survivors / len(members))
    clean_kept = sum(kinds[u] == "clean" for u in kept)
    precision, recall = clean_kept / len(kept), clean_kept / sum(k == "clean" for k in kinds.values())
    assert float(re.search(r'data-metric="precision" data-value="([^"]+)"', page).group(1)) == pytest.approx(precision)
    assert float(re.search(r'data-metric="recall" data-value="([^"]+)"', page).group(1)) == pytest.approx(recall)
    assert (result.precision, result.recall) == (pytest.approx(precision), pytest.approx(recall))
    assert 0.9 < precision and 0.5 < recall < 1  # the filters found the clean samples, not by luck


def test_galleries_show_the_right_samples(filtered: dict, report: tuple) -> None:
    _, page = report
    scores, kept = filtered["scores"], filtered["kept"]
    threshold = float(re.search(r'class="threshold" data-step="1" data-value="([^"]+)"', page).group(1))
    ordered = sorted(filtered["uids"], key=lambda u: scores[u])
    above = [u for u in ordered if scores[u] >= threshold][:SAMPLES]
    below = [u for u in ordered if scores[u] < threshold][-SAMPLES:]
    assert set(gallery(page, "above:1")) == set(above) and set(gallery(page, "below:1")) == set(below)
    assert len(gallery(page, "kept")) == SAMPLES and set(gallery(page, "kept")) <= kept
    assert len(gallery(page, "removed")) == SAMPLES and not set(gallery(page, "removed")) & kept
    short = gallery(page, "removed:3")  # what the caption step removed: passed steps 1-2, fewer than MIN_WORDS words
    assert short and all(len(filtered["texts"][u].split()) < MIN_WORDS and scores[u] >= threshold for u in short)

    clusters = re.findall(
        r'data-cluster="(\d+)" data-kept="(true|false)"><h3>[^<]*</h3><div class="gallery compact" '
        r'data-gallery="cluster:2:\1">(.*?)</div>',
        page,
    )
    assert {state for _, state, _ in clusters} == {"true", "false"}
    for _, state, body in clusters:
        for uid in re.findall(r'data-uid="([0-9a-f]{32})"', body):
            assert scores[uid] >= threshold  # a cluster shows the step's input rows only
            long_enough = len(filtered["texts"][uid].split()) >= MIN_WORDS
            assert (uid in kept) == (state == "true" and long_enough)
    assert page.count('src="data:image/jpeg;base64,') >= 5 * SAMPLES and 'src="data:image/png;base64,' in page


def test_the_report_renders_in_chromium(browser, report: tuple, filtered: dict) -> None:
    browser.get((filtered["root"] / "report" / "report.html").as_uri())
    names = browser.execute_script(
        "return [...document.querySelectorAll('[data-gallery]')].map(g => g.dataset.gallery)"
    )
    assert {"kept", "removed", "above:1", "below:1", "removed:3"} <= set(names) and any(
        n.startswith("cluster:2:") for n in names
    )
    widths = browser.execute_script(
        "return [...document.querySelectorAll('[data-gallery] img')].map(i => i.complete && i.naturalWidth)"
    )
    assert len(widths) >= 5 * SAMPLES and all(w > 0 for w in widths)
    for plot in ("hist-step-1", "hist-model-m"):
        assert (
            browser.execute_script(f"const i = document.getElementById('{plot}'); return i.complete && i.naturalWidth")
            > 300
        )


def test_report_of_a_run_through_the_cli(filtered: dict, tmp_path: Path) -> None:
    from clipsift.pipeline.reshard import read_manifest, reshard

    root = filtered["root"]
    here = os.getcwd()
    os.chdir(root)
    try:  # the manifest records the subset relative to this folder
        reshard("pool", "subset.npy", "shards", shard_size=100, workers=1)
    finally:
        os.chdir(here)
    manifest = read_manifest(str(root / "shards"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "scale": "xs",
                "status": "complete",
                "samples_seen": 12800,
                "seed": 0,
                "data": [
                    {
                        "path": str(root / "shards"),
                        "weight": 1.0,
                        "num_shards": manifest["num_shards"],
                        "manifest": manifest,
                        "subset_sha256": manifest["subset_sha256"],
                    }
                ],
            }
        )
    )
    from clipsift.cli import app

    os.chdir(tmp_path)  # elsewhere: the subset is found from the run's manifest, the pool from subset.json
    try:
        result = CliRunner().invoke(
            app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--samples", "3"], terminal_width=200
        )
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    assert "curation report" in result.output and f"{len(filtered['kept']):,} (" in result.output
    page = (tmp_path / "r.html").read_text()
    assert len(gallery(page, "kept")) == 3 and "Curation report: recipe <code>report_test</code>" in page

    (run / "run.json").write_text(
        json.dumps({"scale": "xs", "data": [{"path": str(root / "shards"), "manifest": {}}]})
    )
    with pytest.raises(ReportError, match="run.json: its data has no reshard manifest naming a subset"):
        curation_report(str(run), str(tmp_path / "s.html"))


def test_a_changed_pool_or_a_subset_without_its_json_is_refused(filtered: dict, tmp_path: Path) -> None:
    root = filtered["root"]
    shutil.copytree(root / "pool", tmp_path / "pool")
    pool = Pool(str(tmp_path / "pool"))
    flipped = np.array([-filtered["scores"][u] for u in filtered["uids"]], np.float32)
    write_model(pool, "m", flipped)
    with pytest.raises(ReportError, match=r"step \d .* now keeps .* re-run `clipsift filter`"):
        curation_report(filtered["subset"], str(tmp_path / "r.html"), pool_url=str(tmp_path / "pool"))
    assert not (tmp_path / "r.html").exists()

    shutil.copy(filtered["subset"], tmp_path / "bare.npy")
    with pytest.raises(ReportError, match="bare.json: missing; the report needs the subset.json"):
        curation_report(str(tmp_path / "bare.npy"), str(tmp_path / "r.html"))


def test_an_edited_subset_file_is_refused(filtered: dict, tmp_path: Path) -> None:
    """The kept rows are compared with the file shard by shard (membership, count, a sum of hashes): a uid
    dropped, or one kept twice in place of another, is told apart."""
    from clipsift.filters.subset import read_subset, write_subset

    stored = read_subset(filtered["subset"])
    assert len(stored) > 3
    folder = tmp_path / "copy"  # beside the files its recipe names
    shutil.copytree(Path(filtered["subset"]).parent, folder)
    for name, edited in (
        ("fewer", stored[1:]),
        ("twice", np.concatenate([stored[:1], stored[:-1]])),
        ("repeated", np.concatenate([stored[:1], stored])),  # every uid, one of them twice: not a weighted recipe
    ):
        path = folder / Path(filtered["subset"]).name
        write_subset(str(path), edited)
        with pytest.raises(ReportError, match="its uids are not the rows its recipe keeps"):
            curation_report(str(path), str(tmp_path / f"{name}.html"), pool_url=str(filtered["root"] / "pool"))


def test_a_weighted_subset_is_reported_by_its_distinct_uids(filtered: dict, tmp_path: Path) -> None:
    """A weight step lists a uid once per copy; the report checks the distinct uids against the recipe's rows."""
    root = filtered["root"]
    recipe = tmp_path / "weighted.yaml"
    recipe.write_text(
        "name: weighted\nsteps:\n  - weight: {by: score_quantile, model_id: m, bins: [0.1, 0.2], counts: [3, 2, 0]}\n"
    )
    subset = tmp_path / "weighted.npy"
    apply_recipe(str(root / "pool"), load_recipe(str(recipe)), str(subset), workers=1)
    listed = read_subset(str(subset))
    assert len(listed) > len(np.unique(listed))  # repeats, so the old exact comparison would refuse it
    result = curation_report(str(subset), str(tmp_path / "w.html"), samples=2, seed=0)
    assert (tmp_path / "w.html").exists() and result is not None


def test_a_plain_subset_of_a_pool_with_repeated_uids_is_reported(tmp_path: Path) -> None:
    """A reshard of a weighted subset holds some uids on two rows; a plain recipe over it lists such a uid once per
    row, and the report accepts that subset (it compares every entry, repeats included)."""
    from clipsift.filters.subset import encode_uids, write_subset
    from clipsift.pipeline.reshard import reshard

    synth_pool(str(tmp_path / "pool"), num_samples=40, shard_size=20, workers=1)
    uids = Pool(str(tmp_path / "pool")).uids().to_pylist()
    write_subset(str(tmp_path / "w.npy"), encode_uids(uids + uids[:3]))  # 3 uids twice
    reshard(str(tmp_path / "pool"), str(tmp_path / "w.npy"), str(tmp_path / "rs"), shard_size=20, workers=1)
    resharded = Pool(str(tmp_path / "rs"))
    rows = sum(resharded.num_rows(s) for s in resharded.shard_ids())
    rng = np.random.default_rng(0)
    write_model(resharded, "m", rng.random(rows).astype(np.float32), rng.normal(size=(rows, 8)).astype(np.float32))
    (tmp_path / "r.yaml").write_text("name: plain\nsteps:\n  - clip_score: {model_id: m, threshold: 0.0}\n")
    apply_recipe(str(tmp_path / "rs"), load_recipe(str(tmp_path / "r.yaml")), str(tmp_path / "s.npy"), workers=1)
    listed = read_subset(str(tmp_path / "s.npy"))
    assert rows == 43 and len(listed) == 43 and len(np.unique(listed)) == 40
    assert curation_report(str(tmp_path / "s.npy"), str(tmp_path / "r.html"), samples=2, seed=0) is not None


def test_distinct_uids_are_counted_and_hashed_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's check of a subset file holds the file's array and chunks of it, not a copy of its distinct
    uids: the same count and digest for every chunk size, repeats across chunk edges included."""
    from clipsift.filters import subset as subset_module
    from clipsift.filters.subset import SUBSET_DTYPE, sort_subset
    from clipsift.pipeline import report as report_module

    rng = np.random.default_rng(5)
    pairs = np.zeros(40, SUBSET_DTYPE)
    pairs["f0"], pairs["f1"] = rng.integers(0, 6, 40), rng.integers(0, 3, 40)  # many repeats
    ordered = sort_subset(pairs)
    distinct = np.unique(ordered)
    whole = (len(distinct), report_module._hash_sum(distinct))
    assert len(distinct) < 20
    every = (len(ordered), report_module._hash_sum(ordered))
    for chunk in (1, 2, 3, 7, 40, 1 << 20):
        monkeypatch.setattr(subset_module, "CHUNK", chunk)
        assert report_module._digest(ordered, distinct=True) == whole, chunk
        assert report_module._digest(ordered, distinct=False) == every, chunk


def test_a_truth_file_is_held_as_sorted_uids_and_a_byte_of_kind_each(tmp_path: Path) -> None:
    """Truth kinds of any uid, as a uid -> kind dict of the file gives them (a uid listed twice: its last kind; a
    null kind and a uid the file lacks: the unknown kind), from sorted uids and a byte each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsift.pipeline.report import UNKNOWN_KIND, Truth
    from clipsift.pipeline.synth import NOISE_MIX

    rng = np.random.default_rng(4)
    uids = [f"{int(x):032x}" for x in rng.integers(0, 2**62, 300)]
    listed = uids[:250] + uids[:20]  # 20 listed twice
    names = [*list(NOISE_MIX)[:3], "zebra", "aardvark", None]
    kinds = [names[i] for i in rng.integers(0, len(names), len(listed))]
    pq.write_table(pa.table({"uid": listed, "kind": pa.array(kinds, pa.string())}), tmp_path / "t.parquet")
    truth = Truth.read(str(tmp_path / "t.parquet"))
    oracle = dict(zip(listed, kinds))
    assert truth.kinds == [*[k for k in NOISE_MIX if k in kinds], "aardvark", "zebra", UNKNOWN_KIND]
    asked = rng.permutation(uids)
    got = [
        truth.kinds[c]
        for c in truth.codes_of(pa.chunked_array([pa.array(list(asked[:150])), pa.array(list(asked[150:]))]))
    ]
    assert got == [oracle.get(u) or UNKNOWN_KIND for u in asked]
    assert truth.uids.nbytes + truth.codes.nbytes == 17 * len(listed)


def test_entries_at_finds_just_the_asked_samples(tmp_path: Path) -> None:
    """The report reads thumbnails through Pool.entries_at: the header search must equal a full sequential read,
    even when a caption starts with another sample's member name, and defer to the sequential reader otherwise."""
    import io
    import tarfile

    from clipsift.pipeline.pool import Sample, derive_uid, finalize_pool, find_entries, sample_key, write_shard

    from conftest import image_bytes

    samples = [
        Sample(derive_uid(f"e/{i}"), image_bytes((i, 9, 9), (8 + i % 5, 8)), "jpg", f"caption {i}", None, 100, 100)
        for i in range(40)
    ]
    samples[2].text = f"{sample_key(0, 30)}.jpg is a file name at the start of a member's data"
    write_shard(str(tmp_path / "pool"), 0, samples)
    finalize_pool(str(tmp_path / "pool"), "entries", [])
    pool = Pool(str(tmp_path / "pool"))
    everything = {entry.key: entry.members for entry in pool.entries("00000000")}
    keys = [sample_key(0, i) for i in (0, 7, 30, 39)]
    assert {k: e.members for k, e in pool.entries_at("00000000", keys).items()} == {k: everything[k] for k in keys}

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            info = tarfile.TarInfo(f"folder/{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert find_entries(buffer.getvalue(), keys) is None  # names under a folder: not searched for
    assert find_entries((tmp_path / "pool" / "shards" / "00000000.tar").read_bytes(), [sample_key(0, 40)]) is None
