"""The `clipsift` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipsift.pipeline.pool import Pool

from conftest import clipsift


def test_help_lists_the_verbs() -> None:
    result = clipsift("--help")
    assert result.returncode == 0
    for verb in ("pool", "demo"):
        assert verb in result.stdout
    pool_help = clipsift("pool", "--help")
    for verb in ("synth", "import", "check"):
        assert verb in pool_help.stdout


def test_the_filtering_network_trains_with_the_tiny_recipe_by_default() -> None:
    """docs/science.md: xs networks are too unreliable to separate recipes; the demo and the bench use tiny."""
    import typer.main

    from clipsift.cli import app

    command = typer.main.get_command(app).commands["filternet"].commands["train"]
    assert next(p for p in command.params if p.name == "scale").default == "tiny"


def test_synth_prints_a_summary_and_writes_the_pool(tmp_path: Path) -> None:
    result = clipsift(
        "pool", "synth", "--out", str(tmp_path / "pool"), "--num-samples", "60", "--shard-size", "25", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "synthetic pool" in result.stderr and "samples/s" in result.stderr
    assert Pool(str(tmp_path / "pool")).info["num_shards"] == 3
    assert pq.read_table(tmp_path / "pool.truth.parquet").num_rows == 60


def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    result = clipsift("pool", "synth", "--out", str(tmp_path / "pool"), "--scale", "huge")
    assert result.returncode == 2
    assert "unknown synthetic scale 'huge'" in result.stderr and "Traceback" not in result.stderr
    missing = clipsift("pool", "check", str(tmp_path / "nothing-here"), "--workers", "1")
    assert missing.returncode == 1 and "no pool.json" in missing.stderr


def test_a_bad_option_value_is_refused_by_its_settings_object_naming_the_option(tmp_path: Path) -> None:
    """The verbs build the stage function's settings section (DownloadSettings, ScoreSettings) from their options:
    its validation is the CLI's, before any work."""
    download = clipsift(
        "pool", "download", str(tmp_path / "urls.parquet"), "--out", str(tmp_path / "pool"), "--threads", "0"
    )
    assert download.returncode == 2 and "--threads: Input should be greater than 0" in download.stderr
    assert not (tmp_path / "pool").exists()
    score = clipsift("score", str(tmp_path / "pool"), "--model", "RN50", "--pretrained", "openai", "--batch-size", "0")
    assert score.returncode == 2 and "--batch-size: Input should be greater than 0" in score.stderr
    assert "Traceback" not in download.stderr + score.stderr


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a suite of one small task and a clipsift-xs checkpoint (random weights) to put in run folders."""
    import open_clip
    import torch
    import yaml

    from clipsift.eval.data import write_task
    from clipsift.train.models import register_model_configs

    from conftest import image_bytes

    root = tmp_path_factory.mktemp("eval_cli")
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30)]
    samples = ({"jpg": image_bytes(c), "cls": str(i % 2).encode()} for i, c in enumerate(colours))
    write_task(str(root / "task"), samples, classnames=["red", "blue"], templates=["a {c} image."])
    task = {"key": "colour", "type": "classification", "metric": "acc1", "data": "task"}
    (root / "suite.yaml").write_text(yaml.safe_dump({"suite": "cli", "tasks": [task]}))
    register_model_configs()
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("clipsift-xs").state_dict()}, root / "model.pt")
    return root


@pytest.mark.parametrize("name", ["run", "download", "make-task", "make-tiny-suite"])
def test_eval_evaluates_a_run_folder_named_like_one_of_its_verbs(
    name: str, eval_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clipsift eval run` with ./run a run folder evaluates it (it said "Missing argument 'RUN|CHECKPOINT'")."""
    import shutil

    from typer.testing import CliRunner

    from clipsift.cli import app

    (tmp_path / name / "checkpoints").mkdir(parents=True)
    shutil.copy(eval_folder / "model.pt", tmp_path / name / "checkpoints" / "epoch_latest.pt")
    (tmp_path / name / "run.json").write_text(json.dumps({"recipe": {"model": "clipsift-xs"}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", name, "--suite", str(eval_folder / "suite.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / name / "eval" / "results.jsonl").read_text())["task"] == "colour"


def test_eval_verbs_stay_verbs_beside_a_folder_that_is_no_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from clipsift.cli import app

    (tmp_path / "make-task").mkdir()  # e.g. tasks written there earlier
    monkeypatch.chdir(tmp_path)
    verb = CliRunner().invoke(app, ["eval", "make-task", "--help"])
    assert verb.exit_code == 0 and "Convertanimagefolder" in "".join(verb.output.split())
    missing = CliRunner().invoke(app, ["eval", "run"])
    assert str(missing.exception) == "run: no such run directory or checkpoint file"  # main() prints it, exits 2


@pytest.mark.slow  # the whole xs chain with its filtering network (test_run.py covers the chain up to reshard fast)
@pytest.mark.timeout(2400)  # about two minutes on an idle 2-core machine; room for a loaded one
def test_demo_runs_the_chain_offline(tmp_path: Path) -> None:
    """The README's main command, quick version: configs/runs/xs.yaml (synth -> filtering network -> score ->
    clip_score 30% -> reshard -> train xs -> eval tiny -> local leaderboard), on Ray."""
    result = clipsift("demo", "--scale", "xs", "--out", str(tmp_path / "demo"), "--workers", "2", timeout=2300)
    assert result.returncode == 0, result.stderr[-3000:]
    demo = tmp_path / "demo"
    assert Pool(str(demo / "pool")).info["num_samples"] == 4096
    assert Pool(str(demo / "reference")).info["num_samples"] == 2048
    provenance = json.loads((demo / "provenance.json").read_text())
    assert (
        provenance["ok"]
        and provenance["stages"]["score"]["weights_sha256"] == provenance["stages"]["filternet"]["weights_sha256"]
    )
    subset = json.loads((demo / "subset.json").read_text())
    assert subset["recipe"]["name"] == "synth_clip_score" and abs(subset["num_uids"] - 0.3 * 4096) <= 2
    manifest = json.loads((demo / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == subset["num_uids"] and manifest["subset_sha256"] == subset["npy_sha256"]
    run = json.loads((demo / "train" / "run.json").read_text())
    assert run["status"] == "complete" and run["data"][0]["subset_sha256"] == subset["npy_sha256"]
    summary = json.loads((demo / "train" / "eval" / "summary.json").read_text())["suites"]["tiny"]
    values = [task["value"] for task in summary["tasks"].values()]
    assert summary["complete"] and len(values) == 8 and abs(summary["average"] - sum(values) / 8) < 1e-9
    assert f"tiny suite average {summary['average']:.3f}" in result.stderr
    assert f"submission {provenance['stages']['submit']['id']} in {demo / 'leaderboard.db'}" in result.stderr
    for stage in ("pool", "reference", "filternet", "score", "filter", "reshard", "train", "eval", "submit"):
        assert f"\n{stage} " in result.stderr  # the per-stage time table
    assert "clipsift leaderboard serve --db" in result.stderr and "clipsift report" in result.stderr
