"""`clipsift eval` end to end on fixtures written by the test in the real on-disk layouts, with an
untrained clipsift-xs checkpoint; every figure is checked against a direct open_clip computation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clipsift import ClipsiftError
from clipsift.eval import run as eval_run
from clipsift.eval.registry import load_suite

ARCH = "clipsift-xs"


# --------------------------------------------------------------------------- fixtures in the real layouts


def image(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    size = tuple(int(x) for x in rng.integers(12, 40, 2))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def npy(values: list[int]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(values, dtype=np.int64))
    return buffer.getvalue()


def write_wds(
    root: Path,
    samples: list[dict[str, bytes]],
    *,
    shards: int = 1,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    dataset_type: str | None = None,
) -> None:
    """clip_benchmark's layout, written with plain tarfile: test/nshards.txt, test/{i}.tar, text files."""
    (root / "test").mkdir(parents=True)
    per = -(-len(samples) // shards)
    for shard in range(shards):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i, members in enumerate(samples[shard * per : (shard + 1) * per], shard * per):
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name, lines in (("classnames.txt", classnames), ("zeroshot_classification_templates.txt", templates)):
        if lines:
            (root / name).write_text("\n".join(lines) + "\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")


CLASSES = ["red square", "blue circle", "green star"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
REGIONS = ["Asia", "Europe", "Other"]


def classification_samples(
    rng: np.random.Generator, n: int, classes: int, meta: bool = False
) -> list[dict[str, bytes]]:
    formats = ["JPEG", "PNG", "WEBP"]
    samples = []
    for i in range(n):
        fmt = formats[i % 3]
        sample = {
            {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]: image(rng, fmt),
            "cls": str(i % classes).encode(),
        }
        if meta:
            sample["npy"] = npy([int(rng.integers(0, 3)), 2016, i % classes])
        samples.append(sample)
    return samples


def winogavil_samples(rng: np.random.Generator) -> list[dict[str, bytes]]:
    samples = []
    for n, k in ((5, 2), (10, 3), (12, 4), (10, 2)):
        candidates = [f"word{j}" for j in range(n)]
        sample = {
            "json": json.dumps(
                {
                    "cue": "apple" if n == 5 else "tree",
                    "candidates": candidates,
                    "associations": [candidates[j] for j in rng.choice(n, k, replace=False)],
                }
            ).encode()
        }
        for j in range(n):
            sample[f"img{j:02d}.jpg"] = image(rng)
        samples.append(sample)
    return samples


def retrieval_samples(rng: np.random.Generator) -> list[dict[str, bytes]]:
    words = ["dog", "cat", "car", "tree", "boat", "house", "bird", "cup"]
    samples = []
    for i in range(6):
        captions = [f"a {words[(i + j) % 8]} next to a {words[(3 * i + j) % 8]}" for j in range(1 + i % 3)]
        samples.append({"jpg": image(rng), "txt": "\n".join(captions).encode()})
    return samples


FAIR_CLASSES = ["age:young", "age:old", "gender:male", "gender:female", "race:group a", "race:group b", "race:group c"]
FAIR_TEMPLATES = ["age:a photo of a {c} person.", "gender:a photo of a {c}.", "race:a photo of a person of {c}."]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(7)
    write_wds(
        root / "mini" / "cls", classification_samples(rng, 14, 3), shards=2, classnames=CLASSES, templates=TEMPLATES
    )
    write_wds(
        root / "mini" / "groups",
        classification_samples(rng, 15, 3, meta=True),
        classnames=CLASSES,
        templates=TEMPLATES,
    )
    write_wds(root / "mini" / "retrieval", retrieval_samples(rng), dataset_type="retrieval")
    write_wds(root / "mini" / "wino", winogavil_samples(rng), dataset_type="winogavil")
    fair = [{"jpg": image(rng), "npy": npy([i % 2, (i // 2) % 2, i % 3, int(i % 3 > 0)])} for i in range(9)]
    write_wds(root / "mini" / "fair", fair, classnames=FAIR_CLASSES, templates=FAIR_TEMPLATES)
    return root


def suite_file(path: Path, sizes: dict[str, int] | None = None) -> str:
    sizes = {"mini/cls": 14, "mini/groups": 15, "mini/retrieval": 6, "mini/wino": 4, "mini/fair": 9, **(sizes or {})}
    tasks = [
        {"key": "mini/cls", "type": "classification", "metric": "acc1", "groups": ["main"], "classes": 3},
        {
            "key": "mini/groups",
            "type": "classification",
            "metric": "acc_worst_region",
            "groups": ["main", "wg"],
            "classes": 3,
            "metadata": {
                "fields": ["region", "year", "y"],
                "group_by": "region",
                "group_names": REGIONS,
                "exclude": ["Other"],
                "name": "worst_region",
            },
        },
        {"key": "mini/retrieval", "type": "retrieval", "metric": "mean_recall@1", "groups": ["ret"], "classes": None},
        {"key": "mini/wino", "type": "winogavil", "metric": "jaccard_score_10-12", "groups": ["ret"], "classes": None},
        {
            "key": "mini/fair",
            "type": "multiobjective",
            "metric": "acc_gender",
            "groups": [],
            "classes": None,
            "scored": False,
            "metadata": {"fields": ["age", "gender", "race", "race_binary"], "group_by": "race"},
        },
    ]
    for task in tasks:
        task.update(source="local", size=sizes[task["key"]], chance=0.1)
    path.write_text(
        yaml.safe_dump(
            {
                "suite": "mini",
                "download": "make-mini --out DATA_DIR",
                "groups": {"main": "Main", "wg": "Worst", "ret": "Retrieval"},
                "tasks": tasks,
            }
        )
    )
    return str(path)


def save_run(root: Path, seed: int = 0) -> Path:
    import open_clip

    from clipsift.train.models import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": open_clip.create_model(ARCH).state_dict()}, root / "checkpoints" / "epoch_latest.pt")
    (root / "run.json").write_text(json.dumps({"scale": "xs", "recipe": {"model": ARCH}}))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def reference(run_dir: Path):
    """Direct open_clip encoders of the checkpoint (no clipsift code in between)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        ARCH, pretrained=str(run_dir / "checkpoints" / "epoch_latest.pt")
    )
    tokenizer = open_clip.get_tokenizer(ARCH)
    model.eval()

    def images(blobs: list[bytes]) -> np.ndarray:
        with torch.no_grad():
            batch = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in blobs])
            return torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()

    def texts(strings: list[str]) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_text(tokenizer(strings)), dim=-1).numpy()

    def classifier(classes: list[str], templates: list[str]) -> np.ndarray:
        columns = []
        for c in classes:
            mean = texts([t.replace("{c}", c) for t in templates]).mean(axis=0)
            columns.append(mean / np.linalg.norm(mean))
        return np.stack(columns, axis=1)

    return images, texts, classifier


def read_tars(root: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in range(int((root / "test" / "nshards.txt").read_text())):
        with tarfile.open(root / "test" / f"{shard}.tar") as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def image_of(sample: dict[str, bytes]) -> bytes:
    return next(sample[e] for e in ("jpg", "png", "webp") if e in sample)


@pytest.fixture(scope="module")
def evaluated(run_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    suite = suite_file(tmp_path_factory.mktemp("suite") / "mini.yaml")
    result = eval_run.evaluate(str(run_dir), suite, data_dir=str(data))
    assert not result.failed, result.failed
    return {
        line["task"]: line for line in map(json.loads, (run_dir / "eval" / "results.jsonl").read_text().splitlines())
    }


# --------------------------------------------------------------------------- each task type end to end


def test_classification_equals_a_direct_open_clip_computation(evaluated: dict, data: Path, reference) -> None:
    images, _, classifier = reference
    samples = read_tars(data / "mini" / "cls")
    logits = images([image_of(s) for s in samples]) @ classifier(CLASSES, TEMPLATES)
    labels = np.array([int(s["cls"]) for s in samples])
    pred = logits.argmax(axis=1)
    line = evaluated["mini/cls"]
    assert line["n"] == 14 and line["metric"] == "acc1" and line["value"] == line["metrics"]["acc1"]
    assert line["value"] == pytest.approx(np.mean(pred == labels))
    assert line["metrics"]["mean_per_class_recall"] == pytest.approx(
        np.mean([np.mean(pred[labels == c] == c) for c in range(3)])
    )
    assert line["metrics"]["acc5"] is None  # 3 classes


def test_worst_group_task_reads_npy_metadata_and_leaves_out_other(evaluated: dict, data: Path, reference) -> None:
    images, _, classifier = reference
    samples = read_tars(data / "mini" / "groups")
    correct = (images([image_of(s) for s in samples]) @ classifier(CLASSES, TEMPLATES)).argmax(axis=1) == [
        int(s["cls"]) for s in samples
    ]
    regions = np.array([int(np.load(io.BytesIO(s["npy"]))[0]) for s in samples])
    per_region = {r: correct[regions == r].mean() for r in np.unique(regions)}
    line = evaluated["mini/groups"]
    assert line["value"] == pytest.approx(min(v for r, v in per_region.items() if REGIONS[r] != "Other"))
    for r, value in per_region.items():
        assert line["metrics"][f"acc_region:{REGIONS[r]}"] == pytest.approx(value)
    assert line["metrics"]["acc1"] == pytest.approx(correct.mean())


def test_retrieval_with_several_captions_equals_brute_force(evaluated: dict, data: Path, reference) -> None:
    images, texts, _ = reference
    samples = read_tars(data / "mini" / "retrieval")
    captions = [c.decode().splitlines() for c in (s["txt"] for s in samples)]
    owner = np.repeat(np.arange(len(samples)), [len(c) for c in captions])
    scores = texts([c for cs in captions for c in cs]) @ images([image_of(s) for s in samples]).T  # [texts, images]
    t2i = np.mean(scores.argmax(axis=1) == owner)
    i2t = np.mean([owner[scores[:, i].argmax()] == i for i in range(len(samples))])
    line = evaluated["mini/retrieval"]
    assert line["metrics"]["num_captions"] == 12 and line["n"] == 6
    assert line["metrics"]["image_retrieval_recall@1"] == pytest.approx(t2i)
    assert line["metrics"]["text_retrieval_recall@1"] == pytest.approx(i2t)
    assert line["value"] == pytest.approx((t2i + i2t) / 2)


def test_winogavil_scores_10_to_12_candidate_examples(evaluated: dict, data: Path, reference) -> None:
    images, texts, _ = reference
    scores = []
    for sample in read_tars(data / "mini" / "wino"):
        info = json.loads(sample["json"])
        n, truth = len(info["candidates"]), np.isin(info["candidates"], info["associations"])
        sims = (
            images([sample[f"img{j:02d}.jpg"] for j in range(n)])
            @ texts([("An " if info["cue"][0] in "aeiou" else "A ") + info["cue"]])[0]
        )
        chosen = np.zeros(n, bool)
        chosen[np.argsort(-sims, kind="stable")[: truth.sum()]] = True
        scores.append((n, (chosen & truth).sum() / (chosen | truth).sum()))
    line = evaluated["mini/wino"]
    assert line["value"] == pytest.approx(np.mean([j for n, j in scores if n >= 10]))
    assert line["metrics"]["jaccard_score_5-6"] == pytest.approx(scores[0][1])
    assert line["metrics"]["num_10-12"] == 3 and line["n"] == 4


def test_multiobjective_fairness_task_is_reported_but_not_averaged(
    evaluated: dict, data: Path, reference, run_dir: Path
) -> None:
    images, _, classifier = reference
    samples = read_tars(data / "mini" / "fair")
    meta = np.stack([np.load(io.BytesIO(s["npy"])) for s in samples])
    gender = (images([image_of(s) for s in samples]) @ classifier(["male", "female"], ["a photo of a {c}."])).argmax(
        axis=1
    ) == meta[:, 1]
    line = evaluated["mini/fair"]
    assert line["scored"] is False and line["value"] == pytest.approx(gender.mean())
    assert line["metrics"]["acc_gender_wg"] == pytest.approx(min(gender[meta[:, 2] == r].mean() for r in range(3)))
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["suites"]["mini"]
    scored = [evaluated[k]["value"] for k in ("mini/cls", "mini/groups", "mini/retrieval", "mini/wino")]
    assert summary["complete"] and summary["average"] == pytest.approx(np.mean(scored))
    assert summary["groups"]["ret"]["value"] == pytest.approx(np.mean(scored[2:]))


# --------------------------------------------------------------------------- resume, cache, failures


def test_results_resume_and_skip_tasks_already_done(run_dir: Path, data: Path, tmp_path: Path) -> None:
    import shutil

    suite = suite_file(tmp_path / "mini.yaml")
    local = tmp_path / "data"
    shutil.copytree(data, local)
    out = tmp_path / "out"
    first = eval_run.evaluate(
        str(run_dir), suite, data_dir=str(local), tasks=["mini/cls", "mini/retrieval"], out=str(out)
    )
    assert [o.status for o in first.outcomes] == ["done", "done"]
    before = (out / "results.jsonl").read_bytes()
    shutil.rmtree(local / "mini" / "cls")  # a task already done needs no data any more
    second = eval_run.evaluate(str(run_dir), suite, data_dir=str(local), out=str(out))
    assert {o.task: o.status for o in second.outcomes} == {
        "mini/cls": "skipped",
        "mini/groups": "done",
        "mini/retrieval": "skipped",
        "mini/wino": "done",
        "mini/fair": "done",
    }
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(before)
    assert sorted(json.loads(line)["task"] for line in after.decode().splitlines()) == sorted(
        ["mini/cls", "mini/groups", "mini/retrieval", "mini/wino", "mini/fair"]
    )
    summary = json.loads((out / "summary.json").read_text())["suites"]["mini"]
    values = [json.loads(line)["value"] for line in after.decode().splitlines() if json.loads(line)["scored"]]
    assert summary["complete"] and summary["average"] == pytest.approx(np.mean(values))


def test_zero_shot_classifiers_are_cached_per_weights_task_and_templates(
    run_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from clipsift.eval import model as eval_model

    suite = suite_file(tmp_path / "mini.yaml")
    local = tmp_path / "data"
    shutil.copytree(data, local)
    out = tmp_path / "out"
    first = eval_run.evaluate(str(run_dir), suite, data_dir=str(local), tasks=["mini/cls"], out=str(out))
    assert len(list((out / "cache").glob("zeroshot__*.npy"))) == 1
    (out / "results.jsonl").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the classifier should come from the cache")

    monkeypatch.setattr(eval_model, "build_classifier", refuse)
    again = eval_run.evaluate(str(run_dir), suite, data_dir=str(local), tasks=["mini/cls"], out=str(out))
    assert again.outcomes[0].value == first.outcomes[0].value
    (out / "results.jsonl").unlink()
    (local / "mini" / "cls" / "zeroshot_classification_templates.txt").write_text("a blurry photo of a {c}.\n")
    with pytest.raises(AssertionError, match="from the cache"):
        eval_run.evaluate(str(run_dir), suite, data_dir=str(local), tasks=["mini/cls"], out=str(out))


def test_missing_data_fails_that_task_with_the_download_command_and_the_others_go_on(
    run_dir: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    data = tmp_path / "datacomp"
    kitti = [{"jpg": image(rng), "cls": str(i % 4).encode()} for i in range(711)]
    names = ["a car on my right", "a car near by", "a car in the distance", "no car"]
    write_wds(data / "vtab" / "kitti_closest_vehicle_distance", kitti, classnames=names, templates=["{c}."])
    out = tmp_path / "out"
    result = eval_run.evaluate(
        str(run_dir),
        "datacomp38",
        data_dir=str(data),
        out=str(out),
        batch_size=512,
        tasks=["cifar10", "vtab/kitti_closest_vehicle_distance", "imagenet1k"],
    )
    status = {o.task: o for o in result.outcomes}
    assert status["vtab/kitti_closest_vehicle_distance"].status == "done"
    for key in ("cifar10", "imagenet1k"):
        assert status[key].status == "failed"
        assert (
            status[key].error.startswith(f"{key}: ")
            and f"clipsift eval download --suite datacomp38 --out {data}" in status[key].error
        )
    summary = json.loads((out / "summary.json").read_text())["suites"]["datacomp38"]
    assert not summary["complete"] and summary["num_evaluated"] == 1 and len(summary["missing"]) == 37
    assert set(summary["failed"]) == {"cifar10", "imagenet1k"}
    kitti_value = status["vtab/kitti_closest_vehicle_distance"].value
    assert summary["average"] == pytest.approx(kitti_value) and summary["groups"]["vtab"]["value"] == pytest.approx(
        kitti_value
    )
    assert len(summary["groups"]["vtab"]["missing"]) == 12


def test_incomplete_data_and_other_weights_are_refused(run_dir: Path, data: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "mini.yaml", sizes={"mini/cls": 15})
    out = tmp_path / "out"
    result = eval_run.evaluate(str(run_dir), suite, data_dir=str(data), tasks=["mini/cls"], out=str(out))
    assert (
        "holds 14 samples, mini/cls has 15" in result.failed[0].error and "make-mini --out" in result.failed[0].error
    )
    eval_run.evaluate(
        str(run_dir), suite_file(tmp_path / "ok.yaml"), data_dir=str(data), tasks=["mini/retrieval"], out=str(out)
    )
    other = save_run(tmp_path / "other", seed=1)
    with pytest.raises(ClipsiftError, match="other weights"):
        eval_run.evaluate(str(other), suite, data_dir=str(data), out=str(out))


def test_targets_checkpoint_files_and_bad_input(run_dir: Path, data: Path, tmp_path: Path) -> None:
    checkpoint = run_dir / "checkpoints" / "epoch_latest.pt"
    with pytest.raises(ClipsiftError, match="--model ARCH"):
        eval_run.evaluate(str(checkpoint), "tiny", data_dir=str(data))
    with pytest.raises(ClipsiftError, match="no such run directory"):
        eval_run.evaluate(str(tmp_path / "nothing"), "tiny")
    suite = suite_file(tmp_path / "mini.yaml")
    result = eval_run.evaluate(
        str(checkpoint), suite, arch=ARCH, data_dir=str(data), tasks=["mini/cls"], out=str(tmp_path / "o")
    )
    assert result.outcomes[0].status == "done"
    line = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert line["model"]["arch"] == ARCH and len(line["model"]["weights_sha256"]) == 64
    assert load_suite(suite).task("mini/cls").size == line["n"]


def test_parallel_data_loading_gives_the_same_results(
    run_dir: Path, data: Path, tmp_path: Path, evaluated: dict
) -> None:
    suite = suite_file(tmp_path / "mini.yaml")
    # mini/cls has 2 tars (split by tar between 2 workers), mini/wino 1 (split by sample)
    eval_run.evaluate(
        str(run_dir),
        suite,
        data_dir=str(data),
        tasks=["mini/cls", "mini/wino"],
        out=str(tmp_path / "o"),
        workers=2,
        batch_size=3,
    )
    for line in map(json.loads, (tmp_path / "o" / "results.jsonl").read_text().splitlines()):
        assert line["metrics"] == pytest.approx(evaluated[line["task"]]["metrics"]), line["task"]


def test_auto_precision_is_datacomps_per_part_on_gpu_and_fp32_on_cpu() -> None:
    """eval_utils/wds_eval.py: the classifier under torch.autocast (fp16 on CUDA), the images with amp=False;
    retr_eval.py: both towers under autocast; wino_eval.py: torch.cuda.amp.autocast. DataComp's classification does
    not run on CPU (a bf16 classifier against fp32 image features), so auto is fp32 there."""
    from clipsift.eval.model import Precision, resolve_precision

    assert resolve_precision("auto", "cuda") == Precision(
        "auto", "cuda", classifier="fp16", images="fp32", retrieval="fp16", association="fp16"
    )
    assert resolve_precision("auto", "cpu") == Precision("auto", "cpu", "fp32", "fp32", "fp32", "fp32")
    assert resolve_precision("bf16", "cpu") == Precision("bf16", "cpu", "bf16", "bf16", "bf16", "bf16")
    assert resolve_precision("fp16", "cuda").record(("retrieval",)) == {
        "setting": "fp16",
        "device": "cuda",
        "retrieval": "fp16",
    }
    with pytest.raises(ClipsiftError, match="--precision fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ClipsiftError, match="--precision 'half': choose auto, fp32, bf16 or fp16"):
        resolve_precision("half", "cpu")


def test_each_part_runs_in_its_precision(run_dir: Path, data: Path, tmp_path: Path) -> None:
    """What the towers see: the classifier's text tower and the image tower in the dtypes of their parts."""
    from clipsift.eval.model import Precision, load_model
    from clipsift.eval.registry import load_suite as load

    model = load_model(ARCH, str(run_dir / "checkpoints" / "epoch_latest.pt"), device="cpu")
    model.precision = Precision("auto", "cpu", classifier="bf16", images="fp32", retrieval="bf16")
    seen = []
    for tower in ("encode_image", "encode_text"):
        original = getattr(model.model, tower)

        def spy(*args, _original=original, _tower=tower, **kwargs):
            seen.append((_tower, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
            return _original(*args, **kwargs)

        setattr(model.model, tower, spy)
    suite = load(suite_file(tmp_path / "mini.yaml"))
    eval_run.evaluate_model(model, suite, [suite.task("mini/cls")], str(data), str(tmp_path / "cls"))
    assert set(seen) == {("encode_text", torch.bfloat16), ("encode_image", None)}
    seen.clear()
    eval_run.evaluate_model(model, suite, [suite.task("mini/retrieval")], str(data), str(tmp_path / "ret"))
    assert set(seen) == {("encode_text", torch.bfloat16), ("encode_image", torch.bfloat16)}


def test_results_of_another_precision_are_not_resumed(run_dir: Path, data: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path / "mini.yaml")
    out = str(tmp_path / "out")
    eval_run.evaluate(str(run_dir), suite, data_dir=str(data), tasks=["mini/cls"], out=out, precision="fp32")
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert line["precision"] == {"setting": "fp32", "device": "cpu", "classifier": "fp32", "images": "fp32"}
    with pytest.raises(ClipsiftError, match="computed with --precision fp32 on cpu .*this run is --precision bf16"):
        eval_run.evaluate(str(run_dir), suite, data_dir=str(data), out=out, precision="bf16")
