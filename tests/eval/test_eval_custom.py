"""Custom evaluation suites: image folders and CSV/Parquet tables evaluated as they are, the same data
converted by `eval make-task` into the webdataset layout giving the same results, and each error a
suite file can hold, named with the file, the task and the field before any work starts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_eval_run import save_run
from typer.testing import CliRunner

from clipsift import ClipsiftError
from clipsift.eval import run as eval_run
from clipsift.eval.layouts import make_task, open_task, read_entry
from clipsift.eval.registry import load_suite, parse_suite

from conftest import REPO

CLASSES = ["circle", "square", "star"]
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


def write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = tuple(int(x) for x in rng.integers(16, 40, 2))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, format=FORMATS[path.suffix[1:]]
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/<class>/... (one nested folder, a BMP that becomes PNG), labels.csv over the same files with a
    group column, captions.csv (several rows per image) and captions.parquet (a list cell per image)."""
    root = tmp_path_factory.mktemp("custom")
    rng = np.random.default_rng(11)
    rows = []
    for c, name in enumerate(CLASSES):
        for i, ext in enumerate(["jpg", "png", "webp", "bmp" if c == 0 else "jpg"]):
            relative = f"images/{name}/{'more/' if i == 3 else ''}{i}.{ext}"
            write_image(root / relative, rng)
            rows.append({"file": relative, "diagnosis": name, "site": ["arm", "leg", "back"][(c + i) % 3]})
    (root / "labels.csv").write_text(
        "file,diagnosis,site\n" + "".join(f"{r['file']},{r['diagnosis']},{r['site']}\n" for r in rows)
    )
    captions = {
        f"photos/{i}.jpg": [
            f"a {w} on a table" for w in ("cup", "dog", "cat", "car", "pen", "hat", "box", "sun")[i : i + 1 + i % 3]
        ]
        for i in range(6)
    }
    for path in captions:
        write_image(root / path, rng)
    lines = [f"{path},{text}\n" for path, texts in captions.items() for text in texts]
    (root / "captions.csv").write_text("image,caption\n" + "".join(lines))
    pq.write_table(pa.table({"image": list(captions), "texts": list(captions.values())}), root / "captions.parquet")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def made(data: Path) -> dict[str, Path]:
    """The same data in the webdataset layout, written by make-task (the table through the CLI, 5 samples a tar)."""
    from clipsift.cli import app

    out = {
        "folder": data / "made" / "folder",
        "table": data / "made" / "table",
        "captions": data / "made" / "captions",
    }
    make_task(str(data / "images"), "classification", str(out["folder"]))
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "make-task",
            "--from",
            str(data / "labels.csv"),
            "--type",
            "classification",
            "--out",
            str(out["table"]),
            "--shard-size",
            "5",
            "--image-column",
            "file",
            "--label-column",
            "diagnosis",
            "--group-column",
            "site",
        ],
    )
    assert result.exit_code == 0, result.output
    make_task(str(data / "captions.csv"), "retrieval", str(out["captions"]), shard_size=4)
    return out


SUITE = {
    "suite": "shapes",
    "groups": {"cls": "Classification", "ret": "Retrieval"},
    "tasks": [
        {"key": "folder", "type": "classification", "metric": "acc1", "groups": ["cls"], "data": "images"},
        {
            "key": "table",
            "type": "classification",
            "metric": "acc_wg",
            "groups": ["cls"],
            "data": "labels.csv",
            "columns": {"image": "file", "label": "diagnosis", "group": "site"},
        },
        {
            "key": "captions/csv",
            "type": "retrieval",
            "metric": "mean_recall@1",
            "groups": ["ret"],
            "data": "captions.csv",
            "size": 6,
        },
        {
            "key": "captions/parquet",
            "type": "retrieval",
            "metric": "mean_recall@1",
            "data": "captions.parquet",
            "columns": {"caption": "texts"},
            "scored": False,
        },
    ],
}


def write_suite(path: Path, suite: dict) -> str:
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def evaluated(data: Path, made: dict[str, Path], run_dir: Path) -> dict[str, dict]:
    made_tasks = [{**read_entry(str(made[name])), "key": f"made/{name}"} for name in ("folder", "table", "captions")]
    suite = write_suite(data / "shapes.yaml", {**SUITE, "tasks": SUITE["tasks"] + made_tasks})
    result = eval_run.evaluate(str(run_dir), suite, out=str(data / "eval"))
    assert not result.failed, result.failed
    return {line["task"]: line for line in map(json.loads, (data / "eval" / "results.jsonl").read_text().splitlines())}


def tar_members(root: Path) -> list[dict[str, bytes]]:
    samples = []
    for shard in range(int((root / "test" / "nshards.txt").read_text())):
        with tarfile.open(root / "test" / f"{shard}.tar") as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(member).read()
    return [members for _, members in samples]


# --------------------------------------------------------------------------- end to end


def test_folder_and_table_equal_their_webdataset_versions(evaluated: dict) -> None:
    for direct, converted in (("folder", "made/folder"), ("table", "made/table"), ("captions/csv", "made/captions")):
        assert evaluated[direct]["n"] == evaluated[converted]["n"]
        assert evaluated[direct]["metrics"] == pytest.approx(evaluated[converted]["metrics"], rel=1e-6), direct
        assert evaluated[direct]["value"] == pytest.approx(evaluated[converted]["value"], rel=1e-6)
    assert evaluated["folder"]["n"] == 12 and evaluated["made/captions"]["n"] == 6
    assert evaluated["made/captions"]["metrics"]["num_captions"] == 12


def test_folder_and_table_samples_are_the_members_make_task_writes(evaluated: dict, data: Path) -> None:
    suite = load_suite(str(data / "shapes.yaml"))
    for direct, converted in (("folder", "made/folder"), ("table", "made/table"), ("captions/csv", "made/captions")):
        opened = [open_task(suite, suite.task(key), "") for key in (direct, converted)]
        entries = [[(e.key, e.members) for _, _, e in data.entries()] for data in opened]
        assert entries[0] == entries[1] and len(entries[0]) == evaluated[direct]["n"], direct
        assert opened[0].classnames == opened[1].classnames and opened[0].templates == opened[1].templates
        assert opened[0].metadata == opened[1].metadata
    shards = open_task(suite, suite.task("made/table"), "")
    assert shards.files is None and len(shards.tars) == 3  # read from the tars, not the table


def test_the_same_images_and_labels_score_alike_in_any_layout(evaluated: dict) -> None:
    folder, table = evaluated["folder"]["metrics"], evaluated["table"]["metrics"]
    for metric in ("acc1", "mean_per_class_recall", "F1-macro_all"):
        assert table[metric] == pytest.approx(folder[metric])
    groups = {g: table[f"acc_site:{g}"] for g in ("arm", "back", "leg")}
    assert (
        table["acc_wg"] == pytest.approx(min(groups.values())) and sum(table[f"count_site:{g}"] for g in groups) == 12
    )
    assert evaluated["captions/parquet"]["metrics"] == pytest.approx(evaluated["captions/csv"]["metrics"])


def test_summary_averages_the_custom_suite(evaluated: dict, data: Path) -> None:
    summary = json.loads((data / "eval" / "summary.json").read_text())["suites"]["shapes"]
    scored = [k for k in evaluated if k != "captions/parquet"]
    assert summary["complete"] and summary["num_scored"] == 6
    assert summary["average"] == pytest.approx(np.mean([evaluated[k]["value"] for k in scored]))
    assert summary["groups"]["ret"]["value"] == pytest.approx(evaluated["captions/csv"]["value"])
    assert summary["sha256"] == load_suite(str(data / "shapes.yaml")).sha256
    assert all(line["suite_sha256"] == summary["sha256"] for line in evaluated.values())


def test_make_task_writes_clip_benchmark_layout_with_defaults(data: Path, made: dict[str, Path]) -> None:
    folder = made["folder"]
    assert (folder / "classnames.txt").read_text().splitlines() == CLASSES
    assert (folder / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}."]
    samples = tar_members(folder)
    assert [int(s["cls"]) for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert sum("png" in s for s in samples) == 4  # the BMP went in as PNG
    table = made["table"]
    assert (table / "test" / "nshards.txt").read_text().strip() == "3"
    assert [np.load(io.BytesIO(s["npy"])).tolist() for s in tar_members(table)][:3] == [
        [0],
        [2],
        [1],
    ]  # arm, leg, back
    entry = read_entry(str(table))
    assert entry["metadata"] == {"fields": ["site"], "group_by": "site", "group_names": ["arm", "back", "leg"]}
    assert entry["size"] == 12 and entry["classes"] == 3 and entry["metric"] == "acc_wg"
    captions = tar_members(made["captions"])
    assert (made["captions"] / "dataset_type.txt").read_text().strip() == "retrieval"
    assert [s["txt"].decode().count("\n") + 1 for s in captions] == [1, 2, 3, 1, 2, 3]


def test_a_made_task_folder_moves_with_its_task_yaml(data: Path, run_dir: Path, tmp_path: Path) -> None:
    """task.yaml's `data` is relative to task.yaml, and a suite that includes it resolves it there (finding 5)."""
    import shutil

    made = make_task(str(data / "images"), "classification", str(tmp_path / "before" / "lesions"))
    assert (
        made.entry["data"] == "."
        and yaml.safe_load((tmp_path / "before/lesions/task.yaml").read_text())[0]["data"] == "."
    )
    shutil.move(str(tmp_path / "before"), str(tmp_path / "after"))
    assert read_entry(str(tmp_path / "after" / "lesions"))["data"] == str(tmp_path / "after" / "lesions")
    suites = tmp_path / "suites"
    suites.mkdir()
    suite = write_suite(
        suites / "moved.yaml",
        {
            "suite": "moved",
            "tasks": [{"include": "../after/lesions/task.yaml", "key": "moved/lesions", "scored": True}],
        },
    )
    loaded = load_suite(suite)
    task = loaded.task("moved/lesions")
    assert task.data.path == str(tmp_path / "after" / "lesions") and task.size == 12 and task.metric == "acc1"
    result = eval_run.evaluate(str(run_dir), suite, out=str(tmp_path / "eval"))
    assert [o.status for o in result.outcomes] == ["done"]
    (tmp_path / "after" / "lesions" / "task.yaml").write_text(
        yaml.safe_dump([{**yaml.safe_load((tmp_path / "after/lesions/task.yaml").read_text())[0], "size": 13}])
    )
    assert load_suite(suite).sha256 != loaded.sha256  # an edited task.yaml is another definition
    with pytest.raises(ClipsiftError, match="task 1: include: cannot read .*nowhere/task.yaml"):
        load_suite(write_suite(suites / "bad.yaml", {"suite": "b", "tasks": [{"include": "nowhere/task.yaml"}]}))


def test_make_task_scores_unequal_classes_by_mean_per_class_recall(data: Path, tmp_path: Path) -> None:
    """Classes of very different sizes get mean_per_class_recall (as DataComp scores Caltech-101, Aircraft,
    Flowers and Pets); --metric overrides; nearly equal classes keep acc1."""
    from clipsift.cli import app

    rng = np.random.default_rng(5)
    for name, count in (("big", 7), ("small", 2), ("mid", 5)):
        for i in range(count):
            write_image(tmp_path / "unequal" / name / f"{i}.jpg", rng)
    for name, count in (("a", 4), ("b", 3)):
        for i in range(count):
            write_image(tmp_path / "close" / name / f"{i}.jpg", rng)
    unequal = make_task(str(tmp_path / "unequal"), "classification", str(tmp_path / "t1"))
    assert unequal.entry["metric"] == "mean_per_class_recall" == read_entry(str(tmp_path / "t1"))["metric"]
    assert make_task(str(tmp_path / "close"), "classification", str(tmp_path / "t2")).entry["metric"] == "acc1"
    args = ["eval", "make-task", "--from", str(tmp_path / "unequal"), "--type", "classification"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t3"), "--metric", "F1-macro_all"])
    assert result.exit_code == 0, result.output
    assert read_entry(str(tmp_path / "t3"))["metric"] == "F1-macro_all" and "F1-macro_all" in result.output
    with pytest.raises(ClipsiftError, match="--metric: 'acc7' is not a metric of this classification task"):
        make_task(str(tmp_path / "unequal"), "classification", str(tmp_path / "t4"), metric="acc7")


def test_progress_bars_count_to_the_tasks_sample_total(
    data: Path, made: dict[str, Path], run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A webdataset task without `size` counts its tars' samples for the bar's total (it showed `12/?`)."""
    task = {"key": "made", "type": "classification", "metric": "acc1", "data": str(made["table"])}
    suite = write_suite(tmp_path / "nosize.yaml", {"suite": "nosize", "tasks": [task]})
    capsys.readouterr()
    eval_run.evaluate(str(run_dir), suite, out=str(tmp_path / "eval"))
    shown = capsys.readouterr().err
    assert "12/12" in shown and "/?" not in shown, shown

    from clipsift.eval.data import count_samples

    tars = sorted(str(p) for p in (made["table"] / "test").glob("*.tar"))
    assert count_samples(tars) == 12 and len(tars) == 3


def test_make_task_resumes_and_refuses_other_data(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "task"
    names = tmp_path / "names.txt"
    names.write_text("circle\tround shape\nsquare\tsquare\nstar\tfive-pointed star\n")
    first = make_task(
        str(data / "images"),
        "classification",
        str(out),
        shard_size=5,
        classnames={"circle": "round shape", "square": "square", "star": "five-pointed star"},
        templates=["a drawing of a {c}."],
    )
    assert (first.shards, first.written) == (3, 3)
    assert (out / "classnames.txt").read_text().splitlines() == ["round shape", "square", "five-pointed star"]
    before = (out / "test" / "1.tar").read_bytes()
    (out / "test" / "1.tar").unlink()
    (out / "test" / "nshards.txt").unlink()  # as a killed run leaves it
    again = make_task(
        str(data / "images"),
        "classification",
        str(out),
        shard_size=5,
        classnames={"circle": "round shape", "square": "square", "star": "five-pointed star"},
        templates=["a drawing of a {c}."],
    )
    assert again.written == 1 and (out / "test" / "1.tar").read_bytes() == before
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"
    with pytest.raises(ClipsiftError, match="other data or settings.*shard_size"):
        make_task(
            str(data / "images"),
            "classification",
            str(out),
            shard_size=4,
            classnames={"circle": "round shape", "square": "square", "star": "five-pointed star"},
            templates=["a drawing of a {c}."],
        )
    with pytest.raises(ClipsiftError, match="--type regression"):
        make_task(str(data / "images"), "regression", str(tmp_path / "x"))
    with pytest.raises(ClipsiftError, match="label 'star'.*not in the class list"):
        make_task(str(data / "images"), "classification", str(tmp_path / "y"), classnames=["circle", "square"])


def test_results_of_an_edited_suite_are_not_resumed_and_other_suites_keep_their_summary(
    data: Path, evaluated: dict, run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    suite = {**SUITE, "tasks": SUITE["tasks"][:1]}
    eval_run.evaluate(str(run_dir), write_suite(data / "one.yaml", suite), out=str(out))
    other = {**suite, "suite": "other"}
    eval_run.evaluate(str(run_dir), write_suite(data / "other.yaml", other), out=str(out))
    summary = json.loads((out / "summary.json").read_text())["suites"]
    assert set(summary) == {"shapes", "other"} and summary["shapes"]["average"] == pytest.approx(
        evaluated["folder"]["value"]
    )
    edited = {**suite, "tasks": [{**suite["tasks"][0], "templates": ["a sketch of a {c}."]}]}
    with pytest.raises(ClipsiftError, match="another definition of suite shapes"):
        eval_run.evaluate(str(run_dir), write_suite(data / "edited.yaml", edited), out=str(out))


# --------------------------------------------------------------------------- validation


def bad(data: Path, task: dict, name: str = "bad.yaml") -> str:
    entry = {"key": "t", "type": "classification", "metric": "acc1", "data": "images", **task}
    return write_suite(data / name, {"suite": "bad", "tasks": [{k: v for k, v in entry.items() if v is not None}]})


@pytest.mark.parametrize(
    "task, field, message",
    [
        ({"metric": "acc7"}, "metric", "'acc7' is not a metric of this classification task; choose one of acc1, acc5"),
        ({"metric": "acc_wg"}, "metric", "worst-group metrics need a group"),
        ({"type": "regression"}, "type", "'regression' is not one of classification, retrieval"),
        ({"metric": None}, "metric", "missing required field"),
        ({"templtes": ["{c}"]}, "templtes", "unknown field"),
        ({"templates": ["a photo"]}, "templates", "has no {c}"),
        ({"groups": ["nowhere"]}, "groups", "not declared"),
        ({"layout": "hdf5"}, "layout", "not one of wds, folder, table"),
        (
            {"type": "retrieval", "metric": "mean_recall@1", "columns": {"label": "x"}},
            "columns.label",
            "a retrieval task has no label column",
        ),
        (
            {"columns": {"image": "file", "caption": "text"}},
            "columns.caption",
            "a classification task has no caption column",
        ),
        (
            {"type": "retrieval", "metric": "mean_recall@1", "classnames": ["a"]},
            "classnames",
            "only classification or multilabel tasks",
        ),
        ({"classnames": ["a", "b"], "classes": 3}, "classes", "3, but classnames lists 2"),
        ({"data": None, "columns": {"image": "file"}}, "data", "`columns` needs the data's path"),
        ({"recall_k": [1]}, "recall_k", "only retrieval tasks have this field, not classification"),
        (
            {"type": "retrieval", "metric": "mean_recall@1", "recall_k": [5, 5]},
            "recall_k",
            "a list of distinct whole numbers k >= 1",
        ),
        (
            {"type": "retrieval", "metric": "mean_recall@1", "recall_k": [5, 10]},
            "metric",
            "'mean_recall@1' is not a metric of this retrieval task; choose one of image_retrieval_recall@5",
        ),
        (
            {"type": "retrieval", "metric": "mean_recall@1", "classifiers": ["c.npz"]},
            "classifiers",
            "only classification or multilabel tasks have this field, not retrieval",
        ),
        ({"classifiers": [""]}, "classifiers", "a list of classifier files"),
        ({"classifiers": ["c.npz"], "templates": ["a {c}."]}, "templates", "leave out templates"),
        (
            {"classnames": ["circle", "square"], "templates": {"circle": ["a round thing"]}},
            "templates",
            "no prompts for class 'square'",
        ),
        ({"templates": {"circle": []}}, "templates.circle", "a non-empty list of non-empty strings"),
        ({"type": "multilabel", "metric": "acc1"}, "metric", "choose one of mean_average_precision"),
    ],
)
def test_definition_errors_name_the_file_task_and_field(data: Path, task: dict, field: str, message: str) -> None:
    path = bad(data, task)
    with pytest.raises(ClipsiftError) as err:
        load_suite(path)
    assert str(err.value).startswith(f"{path}: task t: {field}: ") and message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "task, field, message",
    [
        ({"data": "nowhere"}, "data", "nowhere does not exist"),
        (
            {
                "data": "labels.csv",
                "columns": {"image": "file", "label": "diagnosis"},
                "classnames": ["circle", "square"],
            },
            "classnames",
            "label 'star' (of ",
        ),
        ({"classnames": {"circle": "round", "star": "star"}}, "classnames", "label 'square' (of "),
        ({"data": "empty"}, "data", "holds no images"),
        ({"data": "empty.csv"}, "data", "has no rows; the task is empty"),
        ({"data": "labels.csv"}, "columns.image", "has no column 'image' (its columns: file, diagnosis, site)"),
        ({"data": "missing.csv"}, "columns.image", "1 image files of"),
        ({"data": "images", "size": 13}, "size", "holds 12 samples, the suite says 13"),
        ({"data": "made/folder", "classes": 4}, "classes", "the data has 3 classes, the suite says 4"),
        ({"columns": {"label": "diagnosis"}}, "columns", "only a table has columns; "),
        ({"type": "retrieval", "metric": "mean_recall@1"}, "layout", "an image folder holds classification data"),
        (
            {"type": "winogavil", "metric": "jaccard_score_10-12", "data": "captions.csv"},
            "layout",
            "read only in the webdataset layout",
        ),
        ({"templates": {"circle": ["a"], "square": ["b"]}}, "templates", "no prompts for class 'star'"),
        (
            {"templates": {"circle": ["a"], "square": ["b"], "star": ["c"], "moon": ["d"]}},
            "templates",
            "'moon' is not one of the task's classes (circle, square, star)",
        ),
        ({"data": "made/folder", "templates": {"circle": ["a"]}}, "templates", "no prompts for class 'square'"),
        ({"classifiers": ["nowhere.npz"]}, "classifiers", "nowhere.npz does not exist"),
    ],
)
def test_data_errors_stop_the_run_before_any_work(
    data: Path, made: dict, run_dir: Path, task: dict, field: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (data / "empty" / "circle").mkdir(parents=True, exist_ok=True)
    (data / "empty.csv").write_text("image,label\n")
    (data / "missing.csv").write_text("image,label\nimages/circle/0.jpg,circle\nimages/circle/9.jpg,circle\n")
    path = bad(data, task, "bad_data.yaml")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(eval_run, "load_model", refuse)
    with pytest.raises(ClipsiftError) as err:
        eval_run.evaluate(str(run_dir), path)
    assert str(err.value).startswith(f"{path}: task t: {field}: ") and message in str(err.value), str(err.value)


def test_suite_level_errors_name_the_file(data: Path) -> None:
    for suite, message in (
        ({"suite": "x", "tasks": []}, "tasks: a suite needs a non-empty list"),
        (
            {"suite": "x", "tasks": [{"key": "a", "type": "retrieval", "metric": "mean_recall@1"}], "owner": "me"},
            "owner: unknown field",
        ),
        ({"tasks": [{"key": "a", "type": "retrieval", "metric": "mean_recall@1"}]}, "suite: missing required field"),
    ):
        path = write_suite(data / "suite_level.yaml", suite)
        with pytest.raises(ClipsiftError, match=f"^{path}: {message}"):
            load_suite(path)


def test_builtin_suites_fit_the_same_schema() -> None:
    for name in ("datacomp38", "tiny"):
        suite = load_suite(name)
        assert all(t.data is None for t in suite.tasks)  # DATA_DIR/<key>, webdataset layout
        again = parse_suite(yaml.safe_load(Path(suite.path).read_text()), suite.path)
        assert again == suite


def test_the_documented_example_suite_parses() -> None:
    doc = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    block = doc.split("A complete suite file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    suite = parse_suite(yaml.safe_load(block), "/somewhere/derm.yaml")
    assert [t.type for t in suite.tasks] == ["classification"] * 3 + ["retrieval"] + ["classification"] * 2
    table = suite.task("lesions/table")
    assert table.data.path == "/somewhere/data/lesions.csv" and table.class_keys == ("mel", "nv", "bcc")
    assert (
        suite.task("lesions/by_skin_type").data.group == "fitzpatrick" and suite.task("lesions/external").data is None
    )
    assert len(suite.scored) == 5 and set(suite.groups) == {"lesions", "retrieval"}


def test_the_documented_extra_fields_parse() -> None:
    doc = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    block = doc.split("More fields, in entries of their own", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    entries = yaml.safe_load(block)
    assert entries[0] == {"include": "tasks/lesions/task.yaml", "groups": ["lesions"]}
    suite = parse_suite({"suite": "more", "groups": {"lesions": "L"}, "tasks": entries[1:]}, "/somewhere/more.yaml")
    assert suite.task("lesions/prompts").templates["square"] == ("a dermoscopy image of a square lesion.",)
    assert suite.task("lesions/ensemble").option("classifiers")[0] == "/somewhere/clf/plain/lesions__folder.npz"
    assert suite.task("reports/recall").option("recall_k") == (1, 20, 50)
    assert suite.task("voc2007_multilabel").kind.name == "multilabel"
