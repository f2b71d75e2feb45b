"""clip_benchmark 1.6.2 (what DataComp's evaluation calls) as the oracle of `clipsift eval`.

One small model (clipsift-xs, random weights from a fixed seed) and three tasks in clip_benchmark's own
webdataset layout, written here: a classification task with classes of unequal sizes, a retrieval task
with 2 to 5 captions per image and a multi-label task (`dataset_type.txt`: multilabel, `npy` 0/1 vectors);
their images are JPEG, WebP, RGB PNG, palette PNG (with and without a transparent index) and RGBA PNG with
varying alpha. Each task is evaluated by clip_benchmark's `zeroshot_classification.evaluate` /
`zeroshot_retrieval.evaluate` on its `build_dataset("wds/...")` loader, and by `clipsift eval` on the same
files; every metric must agree to 1e-6.
"""

from __future__ import annotations

import builtins
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

ARCH = "clipsift-xs"
CLASSES = ["red circle", "blue square", "green star", "yellow moon", "purple heart", "orange tree"]
CLASS_SIZES = (14, 9, 7, 5, 4, 3)
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]
OTHER_TEMPLATES = ["a blurry photo of a {c}.", "art of the {c}."]
MULTILABEL_TEMPLATES = ["a photo of a {c}.", "a {c}."]
BATCH = 16
TOLERANCE = 1e-6


# --------------------------------------------------------------------------- the fixture, in clip_benchmark's layout


def _scene(rng: np.random.Generator) -> Image.Image:
    width, height = (int(x) for x in rng.integers(24, 64, 2))
    image = Image.new("RGB", (width, height), tuple(int(x) for x in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        box = [x, y, x + int(rng.integers(6, 20)), y + int(rng.integers(6, 20))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _encoded(rng: np.random.Generator, number: int) -> tuple[str, bytes]:
    """A scene as JPEG, RGB PNG, palette PNG, palette PNG with a transparent index, RGBA PNG or WebP, in turn."""
    image, buffer, kind = _scene(rng), io.BytesIO(), number % 6
    if kind == 0:
        image.save(buffer, "JPEG", quality=90)
        return "jpg", buffer.getvalue()
    if kind == 5:
        image.save(buffer, "WEBP", quality=90)
        return "webp", buffer.getvalue()
    if kind in (2, 3):
        image = image.convert("P", palette=Image.ADAPTIVE, colors=16)
    if kind == 4:
        pixels = np.asarray(image.convert("RGBA")).copy()
        pixels[..., 3] = rng.integers(0, 256, pixels.shape[:2])
        image = Image.fromarray(pixels, "RGBA")
    image.save(buffer, "PNG", **({"transparency": 0} if kind == 3 else {}))
    return "png", buffer.getvalue()


def _write(root: Path, samples: list[dict[str, bytes]], **texts: list[str]) -> Path:
    """ROOT/test/{0,1}.tar + nshards.txt and ROOT/<name>.txt for each text file, as clip_benchmark_export_wds."""
    (root / "test").mkdir(parents=True)
    half = -(-len(samples) // 2)
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for index in range(shard * half, min(len(samples), (shard + 1) * half)):
                for ext, data in samples[index].items():
                    info = tarfile.TarInfo(f"s{index:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("2\n")
    for name, lines in texts.items():
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import open_clip

    from clipsift.train.models import register_model_configs

    root = tmp_path_factory.mktemp("oracle")
    rng = np.random.default_rng(19)
    labels = [c for c, n in enumerate(CLASS_SIZES) for _ in range(n)]
    rng.shuffle(labels)
    classification = [dict([_encoded(rng, i)], cls=str(label).encode()) for i, label in enumerate(labels)]
    words = ["dog", "cat", "car", "tree", "house", "boat", "bird", "lamp", "chair", "cup"]
    retrieval = []
    for i in range(24):
        captions = [f"a {words[(i + j) % 10]} next to a {words[(3 * i + 2 * j) % 10]}" for j in range(2 + i % 4)]
        retrieval.append(dict([_encoded(rng, i)], txt="\n".join(captions).encode()))
    multilabel = []
    for i in range(30):
        vector = (rng.random(len(CLASSES)) < 0.35).astype(np.float32)
        vector[-1] = 0  # a class without positives: clip_benchmark counts its average precision as 0
        multilabel.append(dict([_encoded(rng, i)], npy=_npy(vector)))
    register_model_configs()
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save({"state_dict": open_clip.create_model(ARCH).state_dict()}, checkpoint)
    templates = "zeroshot_classification_templates"
    return {
        "root": root,
        "checkpoint": checkpoint,
        "cls": _write(root / "cls", classification, classnames=CLASSES, **{templates: TEMPLATES}),
        "ret": _write(root / "ret", retrieval, dataset_type=["retrieval"]),
        "ml": _write(
            root / "ml",
            multilabel,
            classnames=CLASSES,
            dataset_type=["multilabel"],
            **{templates: MULTILABEL_TEMPLATES},
        ),
    }


# --------------------------------------------------------------------------- both sides


@pytest.fixture(scope="module")
def reference(oracle: dict[str, Path]):
    """clip_benchmark's model, tokenizer and wds loaders, as its CLI (and DataComp's wds_eval.py) builds them."""
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    from clipsift.train.models import register_model_configs

    register_model_configs()
    model, _, transform = open_clip.create_model_and_transforms(ARCH, pretrained=str(oracle["checkpoint"]))
    model.eval()

    def loader(name: str, task: str = "zeroshot_classification", **options):
        dataset = build_dataset(
            f"wds/{name}",
            root=str(oracle[name]),
            transform=transform,
            split="test",
            download=False,
            task=task,
            **options,
        )
        return dataset, torch.utils.data.DataLoader(dataset.batched(BATCH), batch_size=None, shuffle=False)

    # clip_benchmark 1.6.2 converts a 1-element array with float() (zeroshot_classification.py:82), which NumPy 2
    # refuses; a module-level `float` that takes the element first leaves its code as it is.
    patch = pytest.MonkeyPatch()
    patch.setattr(
        zeroshot_classification,
        "float",
        lambda value: builtins.float(value.item() if isinstance(value, np.ndarray) else value),
        raising=False,
    )
    yield model, open_clip.get_tokenizer(ARCH), loader
    patch.undo()


def classification_reference(reference, name: str, amp: bool = False, **options) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_classification

    model, tokenizer, loader = reference
    dataset, batches = loader(name, custom_template_file=options.pop("custom_template_file", None))
    return zeroshot_classification.evaluate(
        model, batches, tokenizer, dataset.classes, dataset.templates, "cpu", amp=amp, **options
    )


def retrieval_reference(reference, ks: list[int], amp: bool = False) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_retrieval

    model, tokenizer, loader = reference
    _, batches = loader("ret", "zeroshot_retrieval")
    return zeroshot_retrieval.evaluate(model, batches, tokenizer, "cpu", amp=amp, recall_k_list=ks)


def clipsift_eval(oracle: dict[str, Path], tasks: list[dict], name: str, *options: str) -> dict[str, dict]:
    """`clipsift eval CHECKPOINT --model clipsift-xs --suite SUITE.yaml`: the results lines by task."""
    from clipsift.cli import app

    suite = oracle["root"] / f"{name}.yaml"
    suite.write_text(yaml.safe_dump({"suite": name, "tasks": tasks}, sort_keys=False))
    out = oracle["root"] / f"{name}-eval"
    args = ["eval", str(oracle["checkpoint"]), "--model", ARCH, "--suite", str(suite), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--batch-size", str(BATCH), *options])
    assert result.exit_code == 0, result.output
    return {line["task"]: line for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def assert_same(theirs: dict[str, float], ours: dict[str, float], names: list[str]) -> None:
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], abs=TOLERANCE), (name, ours[name], theirs[name])


CLS = {"key": "cls", "type": "classification", "metric": "acc1", "data": "oracle_cls"}
RET = {"key": "ret", "type": "retrieval", "metric": "mean_recall@1", "data": "oracle_ret"}
ML = {"key": "ml", "type": "multilabel", "metric": "mean_average_precision", "data": "oracle_ml"}
CLASSIFICATION = ["acc1", "acc5", "mean_per_class_recall"]
RECALLS = [f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (1, 5, 10)]


def tasks_at(oracle: dict[str, Path], *tasks: dict) -> list[dict]:
    return [{**t, "data": str(oracle[t["data"].removeprefix("oracle_")])} for t in tasks]


# --------------------------------------------------------------------------- the oracle


def test_the_fixture_holds_palette_and_rgba_images_and_unequal_classes(oracle: dict[str, Path]) -> None:
    modes = set()
    for name in ("cls", "ret", "ml"):
        for shard in (0, 1):
            with tarfile.open(oracle[name] / "test" / f"{shard}.tar") as tar:
                for member in tar.getmembers():
                    if member.name.endswith((".png", ".jpg", ".webp")):
                        image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                        modes.add((image.mode, "transparency" in image.info))
    assert {("P", False), ("P", True), ("RGBA", False), ("RGB", False)} <= modes
    assert len(set(CLASS_SIZES)) == len(CLASS_SIZES)


def test_clipsift_eval_equals_clip_benchmark_on_every_metric(oracle: dict[str, Path], reference) -> None:
    """The default precision on CPU is fp32 (DataComp's classification does not run on CPU); clip_benchmark with
    amp=False, as wds_eval.py encodes images, on the same files."""
    classification = classification_reference(reference, "cls")
    multilabel = classification_reference(reference, "ml")
    retrieval = retrieval_reference(reference, [1, 5, 10])
    ours = clipsift_eval(oracle, tasks_at(oracle, CLS, RET, ML), "oracle")
    assert_same(classification, ours["cls"]["metrics"], CLASSIFICATION)
    assert_same(retrieval, ours["ret"]["metrics"], RECALLS)
    assert_same(multilabel, ours["ml"]["metrics"], ["mean_average_precision"])
    # non-trivial predictions: the metrics differ from each other and from 0 and 1
    assert 0 < classification["acc1"] < classification["acc5"] < 1
    assert classification["mean_per_class_recall"] != pytest.approx(classification["acc1"])
    assert 0 < retrieval["image_retrieval_recall@1"] < retrieval["image_retrieval_recall@10"] < 1
    assert 0 < multilabel["mean_average_precision"] < 1 and ours["ml"]["metrics"]["classes_without_positives"] == 1
    assert ours["cls"]["precision"] == {"setting": "auto", "device": "cpu", "classifier": "fp32", "images": "fp32"}
    assert ours["ret"]["precision"] == {"setting": "auto", "device": "cpu", "retrieval": "fp32"}
    summary = json.loads((oracle["root"] / "oracle-eval" / "summary.json").read_text())
    assert summary["precision"]["setting"] == "auto" and summary["precision"]["retrieval"] == "fp32"


def test_bf16_logits_are_formed_inside_autocast_as_clip_benchmark_forms_them(
    oracle: dict[str, Path], reference
) -> None:
    """clip_benchmark's run_classification forms `100 * features @ classifier` inside autocast; the logits of
    `--precision bf16` are those very numbers (clipsift used to upcast the features first)."""
    from clip_benchmark.metrics import zeroshot_classification

    from clipsift.eval.layouts import open_task
    from clipsift.eval.model import load_model
    from clipsift.eval.registry import parse_suite
    from clipsift.eval.task_types.classification import zero_shot_logits

    model, tokenizer, loader = reference
    dataset, batches = loader("cls")
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=True
    )
    theirs, _ = zeroshot_classification.run_classification(model, classifier, batches, "cpu", amp=True)
    suite = parse_suite({"suite": "s", "tasks": tasks_at(oracle, CLS)})
    ours, _ = zero_shot_logits(
        load_model(ARCH, str(oracle["checkpoint"]), device="cpu", precision="bf16"),
        suite.tasks[0],
        open_task(suite, suite.tasks[0], ""),
        BATCH,
        0,
        None,
    )
    assert np.array_equal(ours, theirs.numpy())
    metrics = clipsift_eval(oracle, tasks_at(oracle, CLS), "oracle_bf16", "--precision", "bf16")["cls"]
    assert_same(classification_reference(reference, "cls", amp=True), metrics["metrics"], CLASSIFICATION)
    assert metrics["precision"] == {"setting": "bf16", "device": "cpu", "classifier": "bf16", "images": "bf16"}


def test_datacomps_split_classifier_under_autocast_images_without(
    oracle: dict[str, Path], reference, tmp_path
) -> None:
    """wds_eval.py: `zero_shot_classifier` under autocast (amp=True), `run_classification(..., amp=False)`. On a
    GPU `auto` is that split with fp16; the same split with bf16 runs here (the classifier kept as float32, as
    CUDA's autocast returns it)."""
    from clip_benchmark.metrics import zeroshot_classification

    from clipsift.eval.model import Precision, load_model
    from clipsift.eval.registry import parse_suite
    from clipsift.eval.run import evaluate_model

    model, tokenizer, loader = reference
    dataset, _ = loader("cls")
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=True
    )
    torch.save(classifier.float(), tmp_path / "classifier.pt")
    theirs = classification_reference(reference, "cls", amp=False, load_clfs=[str(tmp_path / "classifier.pt")])

    loaded = load_model(ARCH, str(oracle["checkpoint"]), device="cpu")
    loaded.precision = Precision("auto", "cpu", classifier="bf16", images="fp32")
    suite = parse_suite({"suite": "split", "tasks": tasks_at(oracle, CLS)})
    evaluate_model(loaded, suite, list(suite.tasks), "", str(tmp_path / "out"), batch_size=BATCH)
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert_same(theirs, line["metrics"], CLASSIFICATION)
    assert line["precision"]["classifier"] == "bf16" and line["precision"]["images"] == "fp32"


def test_recall_k_per_task_equals_clip_benchmark_recall_k_list(oracle: dict[str, Path], reference) -> None:
    retrieval = retrieval_reference(reference, [2, 3])
    task = {**RET, "metric": "text_retrieval_recall@3", "recall_k": [3, 2]}
    line = clipsift_eval(oracle, tasks_at(oracle, task), "oracle_recall_k")["ret"]
    names = [f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in (2, 3)]
    assert_same(retrieval, line["metrics"], names)
    assert "image_retrieval_recall@1" not in line["metrics"] and line["metrics"]["mean_recall@1"] is None
    assert line["value"] == line["metrics"]["text_retrieval_recall@3"]


def test_per_class_prompts_equal_clip_benchmarks_class_specific_prompts(
    oracle: dict[str, Path], reference, tmp_path: Path
) -> None:
    prompts = {
        c: [f"a {c} on a plain background.", f"there is one {c} here"][: 1 + i % 2] for i, c in enumerate(CLASSES)
    }
    (tmp_path / "prompts.json").write_text(json.dumps({"wds/cls": prompts}))
    theirs = classification_reference(reference, "cls", custom_template_file=str(tmp_path / "prompts.json"))
    line = clipsift_eval(oracle, tasks_at(oracle, {**CLS, "templates": prompts}), "oracle_prompts")["cls"]
    assert_same(theirs, line["metrics"], CLASSIFICATION)
    assert theirs != classification_reference(reference, "cls")  # the prompts changed the predictions


def test_saved_classifiers_load_as_an_ensemble_like_clip_benchmarks_load_clfs(
    oracle: dict[str, Path], reference, tmp_path: Path
) -> None:
    """clip_benchmark's save_clf / load_clfs: classifiers of two template sets, averaged without renormalising."""
    from clip_benchmark.metrics import zeroshot_classification

    model, tokenizer, loader = reference
    theirs, ours = [], []
    for number, templates in enumerate((TEMPLATES, OTHER_TEMPLATES)):
        dataset, batches = loader("cls")
        theirs.append(str(tmp_path / f"clip_benchmark_{number}.pt"))
        zeroshot_classification.evaluate(
            model, batches, tokenizer, dataset.classes, templates, "cpu", amp=False, save_clf=theirs[-1]
        )
        folder = tmp_path / f"saved_{number}"
        task = {**CLS, "templates": templates}
        clipsift_eval(oracle, tasks_at(oracle, task), f"oracle_save_{number}", "--save-classifiers", str(folder))
        ours.append(str(folder / "cls.npz"))
    ensemble = classification_reference(reference, "cls", load_clfs=theirs)
    line = clipsift_eval(oracle, tasks_at(oracle, {**CLS, "classifiers": ours}), "oracle_ensemble")["cls"]
    assert_same(ensemble, line["metrics"], CLASSIFICATION)
    assert ensemble != classification_reference(reference, "cls")  # the second template set changed predictions
    assert [c["path"] for c in line["classifiers"]] == ours
    assert line["precision"]["classifier"] == "from the classifier files"


def test_a_classifier_file_of_other_weights_or_classes_is_refused(oracle: dict[str, Path], tmp_path: Path) -> None:
    import open_clip

    from clipsift.cli import app

    folder = tmp_path / "saved"
    clipsift_eval(oracle, tasks_at(oracle, CLS), "oracle_keyed", "--save-classifiers", str(folder))
    saved = str(folder / "cls.npz")
    renamed = {**CLS, "classnames": [c.upper() for c in CLASSES], "classifiers": [saved]}
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save({"state_dict": open_clip.create_model(ARCH).state_dict()}, other)
    for checkpoint, task, message in (
        (oracle["checkpoint"], renamed, "a zero-shot classifier of other classes (6 classes: red circle"),
        (other, {**CLS, "classifiers": [saved]}, "a zero-shot classifier of other weights (weights_sha256"),
    ):
        suite = tmp_path / "keyed.yaml"
        suite.write_text(yaml.safe_dump({"suite": "keyed", "tasks": tasks_at(oracle, task)}))
        args = ["eval", str(checkpoint), "--model", ARCH, "--suite", str(suite), "--out", str(tmp_path / "out")]
        result = CliRunner().invoke(app, args)
        flat = "".join(result.output.split())  # the console folds long lines anywhere
        assert result.exit_code == 1 and "".join(message.split()) in flat, result.output
        assert "cls.npz:azero-shotclassifier" in flat


def test_a_multilabel_sample_needs_a_0_1_vector() -> None:
    from clipsift import ClipsiftError
    from clipsift.eval import task_types
    from clipsift.pipeline.pool import TarEntry

    kind, image = task_types.get("multilabel"), _encoded(np.random.default_rng(0), 0)
    record, images = kind.parse_sample(
        TarEntry("s1", dict([image], npy=_npy(np.array([0.0, 1.0])))), 7, "a.tar", False
    )
    assert record.index == 7 and record.meta.tolist() == [0, 1] and images == [image[1]]
    with pytest.raises(ClipsiftError, match=r"a.tar: sample s1: `npy` labels must be 0 or 1, found \[0, 2\]"):
        kind.parse_sample(TarEntry("s1", dict([image], npy=_npy(np.array([0, 2])))), 7, "a.tar", False)
    with pytest.raises(ClipsiftError, match="a.tar: sample s1 has no `npy` member"):
        kind.parse_sample(TarEntry("s1", dict([image], cls=b"1")), 7, "a.tar", False)
