"""`clipsift quickstart`: a folder of images and captions to a ranked baseline table and its report.

The fast tests check each step on a small folder of drawn icons (RGBA, palette and grey PNGs in one
sub-folder per class); the slow one runs the whole command and opens the report in Chromium.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsift import ClipsiftError
from clipsift.eval.data import iter_entries, open_task_data, parse_sample
from clipsift.eval.registry import load_suite
from clipsift.filters.subset import decode_uids, read_subset
from clipsift.pipeline.importer import import_pool
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.quickstart import (
    CLASSES_KEY,
    RETRIEVAL_KEY,
    QuickstartSettings,
    baselines,
    make_heldout_suite,
    run_config,
    split,
)
from clipsift.pipeline.reshard import reshard
from clipsift.pipeline.run_config import validate_run_config

from conftest import clipsift

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "orange": (240, 150, 30)}


def icon(shape: str, colour: tuple[int, int, int], size: int, mode: str) -> Image.Image:
    """A shape on a transparent background, saved in one of the modes web PNGs come in."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw, box = ImageDraw.Draw(image), (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        draw.ellipse(box, fill=(*colour, 255))
    elif shape == "square":
        draw.rectangle(box, fill=(*colour, 255))
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=(*colour, 255))
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image.convert(mode) if mode != "RGBA" else image


def icon_folder(root: Path, per_class: int = 60) -> Path:
    """SHAPES sub-folders of PNG icons with same-stem captions; every fifth caption names the wrong shape."""
    rng = np.random.default_rng(0)
    modes = ("RGBA", "P", "LA", "RGB")
    for s, shape in enumerate(SHAPES):
        folder = root / shape
        folder.mkdir(parents=True)
        for i in range(per_class):
            name, colour = list(COLOURS.items())[int(rng.integers(len(COLOURS)))]
            icon(shape, colour, int(rng.integers(24, 72)), modes[i % 4]).save(folder / f"{shape}_{i:03d}.png")
            said = shape if i % 5 else SHAPES[(s + 1) % 3]
            (folder / f"{shape}_{i:03d}.txt").write_text(f"a {name} {said} icon\n", encoding="utf-8")
    return root


def records(root: Path, task_type: str) -> list:
    """A task folder's samples as the evaluation reads them."""
    data = open_task_data(str(root), task_type)
    return [parse_sample(entry, task_type, i, source, False)[0] for i, source, entry in iter_entries(data.tars)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    import_pool(str(icon_folder(root / "icons")), str(root / "all"), shard_size=50, workers=1)
    return root


def test_the_split_is_exact_disjoint_complete_and_independent_of_sharding(imported: Path, tmp_path: Path) -> None:
    settings = QuickstartSettings(heldout=0.2)
    train, held = split(str(imported / "all"), tmp_path / "a", settings)
    assert (train, held) == (144, 36)  # round(0.2 * 180)
    train_uids = set(decode_uids(read_subset(str(tmp_path / "a" / "train.npy"))))
    held_uids = set(decode_uids(read_subset(str(tmp_path / "a" / "heldout.npy"))))
    assert not train_uids & held_uids and train_uids | held_uids == set(Pool(str(imported / "all")).uids().to_pylist())
    import_pool(str(imported / "icons"), str(tmp_path / "other"), shard_size=7, workers=1)  # other shards
    split(str(tmp_path / "other"), tmp_path / "b", settings)
    assert set(decode_uids(read_subset(str(tmp_path / "b" / "heldout.npy")))) == held_uids
    split(str(imported / "all"), tmp_path / "c", QuickstartSettings(heldout=0.2, seed=1))
    assert set(decode_uids(read_subset(str(tmp_path / "c" / "heldout.npy")))) != held_uids  # the seed draws anew
    capped = split(str(imported / "all"), tmp_path / "d", QuickstartSettings(heldout=0.2, max_heldout=25))
    assert capped == (155, 25)


def test_too_little_data_is_refused_with_what_to_do(imported: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipsiftError, match=r"180 pairs imported; a quickstart needs at least 220.*add images"):
        split(str(imported / "all"), tmp_path / "s", QuickstartSettings(heldout=0.1))


def test_the_heldout_suite_has_retrieval_and_the_folders_classes(imported: Path, tmp_path: Path) -> None:
    split(str(imported / "all"), tmp_path / "split", QuickstartSettings(heldout=0.2))
    reshard(str(imported / "all"), str(tmp_path / "split" / "heldout.npy"), str(tmp_path / "heldout" / "pool"))
    tasks = make_heldout_suite(tmp_path / "heldout", QuickstartSettings())
    assert tasks == {RETRIEVAL_KEY: 36, CLASSES_KEY: 36}
    suite = load_suite(str(tmp_path / "heldout" / "suite.yaml"))
    assert [t.key for t in suite.tasks] == [RETRIEVAL_KEY, CLASSES_KEY]
    classes = tmp_path / "heldout" / "classes"
    assert (classes / "classnames.txt").read_text().split("\n")[:3] == list(SHAPES)
    held = Pool(str(tmp_path / "heldout" / "pool"))
    sources = [s for shard in held.shard_ids() for s in held.metadata(shard, ["source"]).column("source").to_pylist()]
    labels = [record.label for record in records(classes, "classification")]
    assert [SHAPES[label] for label in labels] == [s.split("/")[0] for s in sources]
    captions = [record.texts for record in records(tmp_path / "heldout" / "retrieval", "retrieval")]
    texts = [t for shard in held.shard_ids() for t in held.metadata(shard, ["text"]).column("text").to_pylist()]
    assert captions == [[t] for t in texts]
    assert make_heldout_suite(tmp_path / "heldout", QuickstartSettings()) == tasks  # made once


def test_unequal_classes_are_scored_by_mean_per_class_recall(imported: Path, tmp_path: Path) -> None:
    """make-task's rule: with the largest class over 1.5x the smallest, acc1 would reward guessing the big one."""
    by_metric = {}
    for name, keep in (("equal", 60), ("unequal", 12)):
        icons = tmp_path / "icons" / name
        icon_folder(icons)
        for extra in sorted((icons / SHAPES[0]).iterdir())[2 * keep :]:  # png + txt per sample
            extra.unlink()
        import_pool(str(icons), str(tmp_path / name / "heldout" / "pool"), shard_size=50, workers=1)
        make_heldout_suite(tmp_path / name / "heldout", QuickstartSettings())
        suite = load_suite(str(tmp_path / name / "heldout" / "suite.yaml"))
        by_metric[name] = {t.key: t.metric for t in suite.tasks}[CLASSES_KEY]
    assert by_metric == {"equal": "acc1", "unequal": "mean_per_class_recall"}


def test_each_baseline_is_a_valid_run_config(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nvars: {n: 3}\nsteps:\n  - caption: {min_words: '${n}'}\n")
    settings = QuickstartSettings(recipe=str(recipe), set={"n": 2}, fraction=0.25)
    found = baselines(settings)
    assert [b.name for b in found] == ["no_filter", "random_25", "clip_score_25", "mine"]
    assert found[-1].set == {"n": 2} and found[1].recipe["steps"][0]["random"]["fraction"] == 0.25
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "suite.yaml").write_text(
        "suite: heldout\ntasks:\n  - {key: heldout/retrieval, type: retrieval, metric: mean_recall@1, data: r}\n"
    )
    weights = tmp_path / "net.pt"
    weights.write_bytes(b"weights")
    for baseline in found:
        config = validate_run_config(run_config(tmp_path, baseline, "clipsift-xs", str(weights), settings), "t", None)
        assert config.filter.set == baseline.set and config.train.scale == "xs" and config.score.model == "clipsift-xs"


def test_other_settings_in_the_same_folder_are_refused(imported: Path, tmp_path: Path) -> None:
    from clipsift.pipeline.quickstart import _check_settings

    _check_settings(tmp_path / "q", str(imported / "icons"), QuickstartSettings())
    _check_settings(tmp_path / "q", str(imported / "icons"), QuickstartSettings(workers=2))  # infrastructure only
    with pytest.raises(ClipsiftError, match=r"other settings \(fraction differ\)"):
        _check_settings(tmp_path / "q", str(imported / "icons"), QuickstartSettings(fraction=0.5))
    with pytest.raises(ClipsiftError, match="--model and --pretrained go together"):
        _check_settings(tmp_path / "r", str(imported / "icons"), QuickstartSettings(model="ViT-B-32"))


@pytest.mark.slow  # a filtering network, three xs trainings and four evaluations: about 4 minutes
@pytest.mark.timeout(2400)
def test_quickstart_ranks_the_baselines_and_its_report_renders(tmp_path: Path, browser) -> None:
    icons = icon_folder(tmp_path / "icons", per_class=80)
    out = tmp_path / "qs"
    result = clipsift("quickstart", str(icons), "--out", str(out), "--filternet-scale", "xs", timeout=2300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "quickstart.json").read_text())
    assert (record["samples"], record["train_samples"], record["heldout_samples"]) == (240, 204, 36)
    names = {b["name"] for b in record["baselines"]}
    assert names == {"no_filter", "random_30", "clip_score_30"}
    averages = [b["average"] for b in record["baselines"]]
    assert averages == sorted(averages, reverse=True)  # ranked
    for baseline in record["baselines"]:
        summary = json.loads((Path(baseline["run"]) / "train" / "eval" / "summary.json").read_text())
        assert abs(summary["suites"]["heldout"]["average"] - baseline["average"]) < 1e-12
        assert set(baseline["tasks"]) == {RETRIEVAL_KEY, CLASSES_KEY}
    kept = {b["name"]: b["kept"] for b in record["baselines"]}
    assert kept["no_filter"] == 204 and kept["random_30"] == round(0.3 * 204)  # random keeps exactly round(f N)
    assert abs(kept["clip_score_30"] - 0.3 * 204) <= 2  # DataComp's quantile threshold, scores at it kept
    assert "#1" in result.stderr and "report" in result.stderr
    again = clipsift("quickstart", str(icons), "--out", str(out), "--filternet-scale", "xs", timeout=600)
    assert (
        again.returncode == 0 and json.loads((out / "quickstart.json").read_text())["baselines"] == record["baselines"]
    )  # a finished quickstart re-run trains nothing and reports the same table
    browser.get((out / "report.html").as_uri())
    rows = browser.execute_script(
        "return [...document.querySelectorAll('tr[data-baseline]')].map(r => r.dataset.baseline)"
    )
    assert rows == [b["name"] for b in record["baselines"]]
    galleries = browser.execute_script(
        "return [...document.querySelectorAll('[data-gallery]')].map(g => [g.dataset.gallery, "
        "[...g.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length])"
    )
    assert dict(galleries) == {"removed:random_30": 18, "removed:clip_score_30": 18}
    plots = browser.execute_script("return [...document.querySelectorAll('img.plot')].map(i => i.naturalWidth)")
    assert len(plots) == 3 and min(plots) > 300
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert os.path.getsize(tmp_path / "report.png") > 10_000
    assert (out / "reports" / "clip_score_30.html").exists()
