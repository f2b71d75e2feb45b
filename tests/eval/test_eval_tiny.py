"""The tiny synthetic suite and the `clipsift eval` verbs, run the way a user runs them."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_eval_run import save_run
from typer.testing import CliRunner

from clipsift.cli import app
from clipsift.eval import tiny
from clipsift.eval.data import iter_entries, open_task_data, parse_sample
from clipsift.eval.registry import load_suite
from clipsift.pipeline import world
from clipsift.pipeline.pool import Pool
from clipsift.pipeline.synth import STREAM_EVAL, synth_pool, synth_reference

runner = CliRunner()


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "suite"
    result = runner.invoke(app, ["eval", "make-tiny-suite", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "tiny/association" in result.output
    return out


def samples_of(root: Path, task_type: str, with_meta: bool = False) -> list:
    data = open_task_data(str(root), task_type)
    return [
        parse_sample(entry, task_type, index, source, with_meta) for index, source, entry in iter_entries(data.tars)
    ]


def test_every_task_is_written_in_the_real_layout_with_the_registry_size(suite_dir: Path) -> None:
    suite = load_suite("tiny")
    info = json.loads((suite_dir / "suite.json").read_text())
    assert info["tasks"] == {t.key: t.size for t in suite.tasks}
    for task in suite.tasks:
        root = suite_dir / task.key
        samples = samples_of(root, task.type)
        assert len(samples) == task.size, task.key
        if task.type == "classification":
            labels = np.array([record.label for record, _ in samples])
            assert (root / "classnames.txt").read_text().count("\n") == task.classes
            assert np.bincount(labels).min() == np.bincount(labels).max()  # balanced classes
    retrieval = samples_of(suite_dir / "tiny" / "retrieval", "retrieval")
    assert all(len(record.texts) == 5 and len(set(record.texts)) == 5 for record, _ in retrieval)
    backgrounds = np.array(
        [
            record.meta[0]
            for record, _ in samples_of(suite_dir / "tiny" / "shape_by_background", "classification", True)
        ]
    )
    counts = np.bincount(backgrounds, minlength=len(world.BACKGROUNDS))
    assert counts.argmax() == 0 and counts.min() > 0  # an imbalanced but complete set of domains


def test_association_examples_pick_the_candidates_that_show_the_cue(suite_dir: Path) -> None:
    examples = samples_of(suite_dir / "tiny" / "association", "winogavil")
    sizes = {len(images) for _, images in examples}
    assert sizes == {5, 6, 10, 12}
    for record, images in examples:
        shown = [c.split("-")[0] for c in record.info["candidates"]]
        assert record.info["associations"] == [
            c for c, s in zip(record.info["candidates"], shown) if s == record.info["cue"]
        ]
        assert 2 <= len(record.info["associations"]) < len(images)


def test_the_suite_is_deterministic_and_held_out_from_pools(suite_dir: Path, tmp_path: Path) -> None:
    make = tiny._TASKS["tiny/shape"][0]
    first = list(make(np.random.default_rng([0, STREAM_EVAL, 0]), 4))
    assert first == list(make(np.random.default_rng([0, STREAM_EVAL, 0]), 4))
    assert first != list(make(np.random.default_rng([1, STREAM_EVAL, 0]), 4))
    eval_images = {
        hashlib.sha256(blob).hexdigest()
        for task in ("shape", "colour", "count")
        for _, blobs in samples_of(suite_dir / "tiny" / task, "classification")
        for blob in blobs
    }
    synth_pool(str(tmp_path / "pool"), num_samples=300, shard_size=300, workers=1)
    synth_reference(str(tmp_path / "reference"), num_samples=300, shard_size=300, workers=1)
    for name in ("pool", "reference"):
        pool = Pool(str(tmp_path / name))
        pool_images = set(pool.metadata(pool.shard_ids()[0], ["sha256"]).column("sha256").to_pylist())
        assert len(pool_images) > 200 and not pool_images & eval_images


def test_cli_evaluates_a_run_on_the_tiny_suite_and_resumes(suite_dir: Path, tmp_path: Path) -> None:
    run = save_run(tmp_path / "run")
    result = runner.invoke(
        app, ["eval", str(run), "--suite", "tiny", "--data-dir", str(suite_dir), "--batch-size", "128"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == [t.key for t in load_suite("tiny").tasks]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    tiny_summary = summary["suites"]["tiny"]
    assert tiny_summary["complete"] and tiny_summary["average"] == pytest.approx(
        np.mean([line["value"] for line in lines])
    )
    assert summary["model"]["arch"] == "clipsift-xs" and "average" in result.output and "complete" in result.output
    again = runner.invoke(
        app, ["eval", "--suite", "tiny", str(run), "--data-dir", str(suite_dir), "--tasks", "tiny/shape,tiny/count"]
    )
    assert again.exit_code == 0 and again.output.count("from results.jsonl") == 2
    assert len((run / "eval" / "results.jsonl").read_text().splitlines()) == len(lines)


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """The console entry point in-process: (exit status, stderr)."""
    from clipsift.cli import main

    monkeypatch.setattr(sys, "argv", ["clipsift", *args])
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_cli_help_and_errors_as_a_user_sees_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    help_text = runner.invoke(app, ["eval", "--help"]).output
    assert "make-tiny-suite" in help_text and "download" in help_text and "RUN|CHECKPOINT" in help_text
    assert (
        "Usage: clipsift eval RUN|CHECKPOINT [OPTIONS]"
        in runner.invoke(app, ["eval", "some-run", "--help"], prog_name="clipsift").output
    )
    run = save_run(tmp_path / "run")
    status, err = run_main(
        ["eval", str(run), "--suite", "datacomp38", "--tasks", "cifar10", "--data-dir", str(tmp_path / "no-data")],
        monkeypatch,
        capsys,
    )
    assert status == 1 and "Traceback" not in err
    assert "cifar10:" in err and "clipsift eval download --suite datacomp38 --out" in err
    status, err = run_main(["eval", "download", "--suite", "tiny", "--out", str(tmp_path / "x")], monkeypatch, capsys)
    assert status == 2 and "make-tiny-suite" in err and "Traceback" not in err


def test_the_tiny_suite_is_written_on_first_use_into_the_default_folder(
    suite_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from clipsift.eval.run import evaluate

    made = []
    monkeypatch.setenv("CLIPSIFT_EVAL_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "make_tiny_suite", lambda out: made.append(out) or shutil.copytree(suite_dir, out))
    run = save_run(tmp_path / "run")
    first = evaluate(str(run), "tiny", tasks=["tiny/count"])
    assert made == [str(tmp_path / "cache" / "tiny")] and first.outcomes[0].status == "done"
    evaluate(str(run), "tiny", tasks=["tiny/colour"])
    assert len(made) == 1  # the folder holds a complete suite now
