"""The suite registry: the DataComp table (reference/datacomp.md) exactly, and the tiny suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from clipsift import ClipsiftError
from clipsift.eval import task_types
from clipsift.eval.registry import load_suite, parse_suite, suite_names

# The reference table: key -> (metric, test size, classes); None marks unscored / no classes.
REFERENCE = {
    "vtab/caltech101": ("mean_per_class_recall", 6085, 102),
    "cifar10": ("acc1", 10000, 10),
    "vtab/cifar100": ("acc1", 10000, 100),
    "vtab/clevr_count_all": ("acc1", 15000, 8),
    "vtab/clevr_closest_object_distance": ("acc1", 15000, 6),
    "country211": ("acc1", 21100, 211),
    "vtab/dtd": ("acc1", 1880, 47),
    "vtab/eurosat": ("acc1", 5400, 10),
    "fgvc_aircraft": ("mean_per_class_recall", 3333, 100),
    "food101": ("acc1", 25250, 101),
    "gtsrb": ("acc1", 12630, 43),
    "imagenet1k": ("acc1", 50000, 1000),
    "imagenet_sketch": ("acc1", 50889, 1000),
    "imagenetv2": ("acc1", 10000, 1000),
    "imagenet-a": ("acc1", 7500, 200),
    "imagenet-o": ("acc1", 2000, 200),
    "imagenet-r": ("acc1", 30000, 200),
    "vtab/kitti_closest_vehicle_distance": ("acc1", 711, 4),
    "mnist": ("acc1", 10000, 10),
    "objectnet": ("acc1", 18574, 113),
    "vtab/flowers": ("mean_per_class_recall", 6149, 102),
    "vtab/pets": ("mean_per_class_recall", 3669, 37),
    "voc2007": ("acc1", 14976, 20),
    "vtab/pcam": ("acc1", 32768, 2),
    "renderedsst2": ("acc1", 1821, 2),
    "vtab/resisc45": ("acc1", 6300, 45),
    "cars": ("acc1", 8041, 196),
    "stl10": ("acc1", 8000, 10),
    "sun397": ("acc1", 108754, 397),
    "vtab/svhn": ("acc1", 26032, 10),
    "retrieval/flickr_1k_test_image_text_retrieval": ("mean_recall@1", 1000, None),
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": ("mean_recall@1", 5000, None),
    "misc/winogavil": ("jaccard_score_10-12", 3563, None),
    "wilds/iwildcam": ("F1-macro_all", 42791, 182),
    "wilds/camelyon17": ("acc1", 85054, 2),
    "wilds/fmow": ("acc_worst_region", 22108, 62),
    "fairness/dollar_street": ("acc_top5_wg", 3503, 58),
    "fairness/geode": ("acc_wg", 12488, 40),
    "fairness/fairface": (None, 10954, None),
    "fairness/utkface": (None, 23703, None),
}
VTAB = {
    "vtab/caltech101",
    "vtab/cifar100",
    "vtab/clevr_count_all",
    "vtab/clevr_closest_object_distance",
    "vtab/dtd",
    "vtab/eurosat",
    "vtab/kitti_closest_vehicle_distance",
    "vtab/flowers",
    "vtab/pets",
    "vtab/pcam",
    "vtab/resisc45",
    "vtab/svhn",
    "sun397",
}
SHIFTS = {"imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"}
RETRIEVAL = {
    "retrieval/flickr_1k_test_image_text_retrieval",
    "retrieval/mscoco_2014_5k_test_image_text_retrieval",
    "misc/winogavil",
}


def test_datacomp38_has_exactly_the_38_scored_tasks_of_the_reference_table() -> None:
    suite = load_suite("datacomp38")
    assert len(suite.tasks) == 40 and len(suite.scored) == 38
    assert {t.key for t in suite.tasks} == set(REFERENCE)
    for task in suite.tasks:
        metric, size, classes = REFERENCE[task.key]
        assert task.scored == (metric is not None), task.key
        if metric is not None:
            assert task.metric == metric, task.key
        assert task.size == size and task.classes == classes, task.key


def test_datacomp38_groups_sources_and_chance() -> None:
    suite = load_suite("datacomp38")
    assert {t.key for t in suite.group_tasks("vtab")} == VTAB
    assert {t.key for t in suite.group_tasks("imagenet_shifts")} == SHIFTS
    assert {t.key for t in suite.group_tasks("retrieval")} == RETRIEVAL
    assert [t.key for t in suite.group_tasks("imagenet")] == ["imagenet1k"]
    assert {t.key for t in suite.group_tasks("wilds")} == {"wilds/iwildcam", "wilds/camelyon17", "wilds/fmow"}
    assert {t.key for t in suite.group_tasks("fairness")} == {"fairness/dollar_street", "fairness/geode"}
    for task in suite.tasks:
        if task.type in ("classification", "multiobjective"):  # djghosh/wds_<key, / -> ->_test, fairness/ dropped
            assert task.source == "djghosh/wds_" + task.key.removeprefix("fairness/").replace("/", "-") + "_test"
        else:
            assert task.source == "nlphuji/" + task.key.split("/")[1]
        if task.metric in ("acc1", "mean_per_class_recall", "acc_wg", "acc_worst_region"):
            assert task.chance == pytest.approx(1 / task.classes, rel=1e-3), task.key
    assert suite.task("fairness/dollar_street").chance == pytest.approx(5 / 58, rel=1e-3)
    fmow = suite.task("wilds/fmow").metadata
    assert fmow.group_by == "region" and fmow.exclude == ("Other",) and fmow.name == "worst_region"


def test_select_by_key_glob_and_group() -> None:
    suite = load_suite("datacomp38")
    assert [t.key for t in suite.select(["cifar10"])] == ["cifar10"]
    assert {t.key for t in suite.select(["vtab/*"])} == VTAB - {"sun397"}
    assert {t.key for t in suite.select(["retrieval", "imagenet1k"])} == RETRIEVAL | {"imagenet1k"}
    with pytest.raises(ClipsiftError, match="no such task or group"):
        suite.select(["imagenet2k"])


def test_tiny_suite_has_every_task_type_and_group() -> None:
    assert {"datacomp38", "tiny"} <= set(suite_names())
    tiny = load_suite("tiny")
    assert {t.type for t in tiny.tasks} == {"classification", "retrieval", "winogavil"}
    assert [t.key for t in tiny.group_tasks("shifts")] == ["tiny/shape_outline"]
    assert tiny.task("tiny/shape_by_background").metadata.group_by == "background"
    assert all(t.scored and t.key.startswith("tiny/") for t in tiny.tasks)
    assert "make-tiny-suite" in tiny.download_command("/data")


def test_a_bad_suite_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "suite: x\ndownload: y\ngroups: {}\ntasks:\n  - {key: a, type: regression, metric: m, source: s, size: 1}\n"
    )
    with pytest.raises(ClipsiftError, match="bad.yaml.*regression"):
        load_suite(str(path))
    with pytest.raises(ClipsiftError, match="unknown suite"):
        load_suite("datacomp39")


def test_suite_hash_ignores_formatting_but_not_content(tmp_path):
    import yaml

    shipped = load_suite("tiny")
    data = yaml.safe_load(Path(shipped.path).read_text(encoding="utf-8"))
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text(
        "# a comment\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=True), encoding="utf-8"
    )
    assert load_suite(str(reformatted)).sha256 == shipped.sha256
    data["tasks"][0]["metric"] = "acc5"
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_suite(str(changed)).sha256 != shipped.sha256


# --------------------------------------------------------------------------- task types are registered classes


UNKNOWN_TYPE = (
    "s: task a: type: 'regression' is not one of classification, retrieval, winogavil, multiobjective, multilabel "
    "(a worst-group classification is `classification` with a group column, see docs/evaluation.md)"
)


def test_an_unknown_task_type_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ClipsiftError) as err:
        parse_suite({"suite": "s", "tasks": [{"key": "a", "type": "regression", "metric": "m"}]})
    assert str(err.value) == UNKNOWN_TYPE
    with pytest.raises(ClipsiftError, match="type: 'regression' is not one of classification, retrieval"):
        task_types.get("regression")


def test_the_built_in_types_declare_what_the_suites_rely_on() -> None:
    assert task_types.names() == ("classification", "retrieval", "winogavil", "multiobjective", "multilabel")
    cls, ret, wino, multi, labels = (task_types.get(name) for name in task_types.names())
    assert cls.main_metrics("wg") == ("acc1", "acc5", "mean_per_class_recall", "F1-macro_all", "acc_wg", "acc_top5_wg")
    assert ret.main_metrics() == (
        "image_retrieval_recall@1",
        "image_retrieval_recall@5",
        "image_retrieval_recall@10",
        "text_retrieval_recall@1",
        "text_retrieval_recall@5",
        "text_retrieval_recall@10",
        "mean_recall@1",
    )
    assert wino.main_metrics()[-1] == "jaccard_score_10-12"
    assert multi.main_metrics(None, ("age", "race")) == ("acc_age", "acc_age_wg", "acc_race", "acc_race_wg")
    assert ret.main_metrics(recall_k=(5, 50)) == (
        "image_retrieval_recall@5",
        "image_retrieval_recall@50",
        "text_retrieval_recall@5",
        "text_retrieval_recall@50",
    )  # no mean_recall@1 without k = 1
    assert labels.main_metrics() == ("mean_average_precision",)
    assert [t.layouts for t in (cls, ret, wino, multi, labels)] == [
        ("wds", "folder", "table"),
        ("wds", "table"),
        ("wds",),
        ("wds",),
        ("wds",),
    ]
    assert [t.type_file for t in (cls, ret, wino, multi, labels)] == [
        None,
        "retrieval",
        "winogavil",
        None,
        "multilabel",
    ]
    assert [t.hub_parquet for t in (cls, ret, wino, multi, labels)] == [False, True, True, False, False]
    assert [t.fields for t in (cls, ret, wino, multi, labels)] == [
        ("classifiers",),
        ("recall_k",),
        (),
        (),
        ("classifiers",),
    ]
    assert [t.precision_parts for t in (cls, ret, wino, multi, labels)] == [
        ("classifier", "images"),
        ("retrieval",),
        ("association",),
        ("classifier", "images"),
        ("classifier", "images"),
    ]
    assert load_suite("tiny").task("tiny/retrieval").kind is ret


class _StubModel:
    """Just enough of EvalModel for `embed_images`: an image's embedding is its mean colour."""

    weights_sha256 = "0" * 64

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def pixels(self, image):
        import numpy as np

        return np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.uint8)

    def encode_images(self, images):
        return images.float().mean(dim=(1, 2)).numpy()

    def describe(self) -> dict:
        return {"arch": "stub", "weights_sha256": self.weights_sha256}


@pytest.fixture
def redness():
    """A task type registered by a test: is an image red (cls 1) or blue (cls 0); its metric is the accuracy."""
    from clipsift.eval.task_types.base import Record, TaskType, image_member, register

    @register
    class Redness(TaskType):
        name = "redness"
        type_file = "redness"
        parsed: ClassVar[list[int]] = []  # indices of the samples parse_sample saw

        def main_metrics(self, group_name=None, objectives=()):
            return ("red_acc",)

        def parse_sample(self, entry, index, source, with_meta):
            self.parsed.append(index)
            return Record(index, label=int(entry.members["cls"].decode())), [image_member(entry, source)]

        def evaluate(self, model, task, data, batch_size, workers, cache_dir):
            import numpy as np

            from clipsift.eval.run import check_size, embed_images

            emb, records = embed_images(model, task, data, batch_size, workers)
            check_size(task, data, len(records))
            red = emb[:, 0] > emb[:, 2]
            labels = np.array([r.label for r in records])
            return {"red_acc": float(np.mean(red == labels)), "num_red": int(red.sum())}, len(records)

    try:
        yield Redness
    finally:
        task_types.REGISTRY.pop("redness")


def test_a_registered_task_type_validates_and_is_evaluated_through_its_class(redness, tmp_path: Path) -> None:
    from clipsift.eval.data import write_task
    from clipsift.eval.run import RESULTS, evaluate_model

    from conftest import image_bytes

    entry = {"key": "custom/redness", "type": "redness", "metric": "red_acc", "size": 4}
    with pytest.raises(ClipsiftError, match="'acc1' is not a metric of this redness task; choose one of red_acc"):
        parse_suite({"suite": "custom", "tasks": [{**entry, "metric": "acc1"}]})
    with pytest.raises(ClipsiftError, match="layout: redness data is read only in the webdataset layout"):
        parse_suite({"suite": "custom", "tasks": [{**entry, "data": "t.csv", "layout": "table"}]})
    with pytest.raises(ClipsiftError, match="only classification or multilabel tasks have class names"):
        parse_suite({"suite": "custom", "tasks": [{**entry, "classnames": ["a", "b"]}]})
    suite = parse_suite({"suite": "custom", "tasks": [entry]})
    assert suite.tasks[0].kind.name == "redness" and isinstance(suite.tasks[0].kind, redness)

    red, blue = image_bytes((220, 20, 20)), image_bytes((20, 20, 220))
    labelled = [(red, 1), (blue, 0), (red, 1), (blue, 1)]  # the last is mislabelled: accuracy 3/4
    samples = ({"jpg": img, "cls": str(label).encode()} for img, label in labelled)
    write_task(str(tmp_path / "data" / "custom" / "redness"), samples, dataset_type="redness")
    result = evaluate_model(_StubModel(), suite, list(suite.tasks), str(tmp_path / "data"), str(tmp_path / "out"))
    assert [(o.status, o.error) for o in result.outcomes] == [("done", None)]
    assert result.outcomes[0].value == pytest.approx(0.75)
    assert sorted(redness.parsed) == [0, 1, 2, 3]
    line = json.loads((tmp_path / "out" / RESULTS).read_text(encoding="utf-8"))
    assert line["metrics"] == {"red_acc": 0.75, "num_red": 2} and line["n"] == 4
    assert result.summary["suites"]["custom"]["average"] == pytest.approx(0.75)

    (tmp_path / "data" / "custom" / "redness" / "dataset_type.txt").write_text("retrieval\n")
    again = evaluate_model(_StubModel(), suite, list(suite.tasks), str(tmp_path / "data"), str(tmp_path / "again"))
    assert "holds retrieval data (dataset_type.txt), the task is redness" in again.outcomes[0].error
