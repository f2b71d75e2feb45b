"""`clipsift run RUN.yaml`: config validation, a whole xs run killed after its filter stage and resumed,
changed configs refused, and the provenance chain checked against the files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from clipsift import ClipsiftError
from clipsift.eval.stage import EvalOutput
from clipsift.pipeline.run import STAGES_FILE, Runner, run_pipeline, stage_names
from clipsift.pipeline.run_config import RunConfigError, load_run_config, shipped_runs
from clipsift.stage import Outputs
from clipsift.train.stages import TrainOutput

from conftest import REPO
from conftest import clipsift_started as clipsift


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_config(path: Path, change: dict | None = None, base: str = "xs") -> Path:
    config = yaml.safe_load((REPO / "configs" / "runs" / f"{base}.yaml").read_text())
    for dotted, value in (change or {}).items():
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(config))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(RunConfigError) as caught:
        load_run_config(str(path))
    return str(caught.value)


# --------------------------------------------------------------------------- validation


def test_shipped_configs_validate() -> None:
    assert {"tiny", "xs", "datacomp_small", "datacomp_medium"} <= set(shipped_runs())
    tiny, _ = load_run_config("tiny")
    assert stage_names(tiny) == [
        "pool",
        "reference",
        "filternet",
        "score",
        "filter",
        "reshard",
        "train",
        "eval",
        "submit",
    ]
    assert (tiny.pool.scale, tiny.train.scale, tiny.eval.suite, tiny.filter.set) == (
        "tiny",
        "tiny",
        "tiny",
        {"fraction": 0.3},
    )
    for name, scale in (("datacomp_small", "small"), ("datacomp_medium", "medium")):
        config, where = load_run_config(name)
        assert where == f"{name}.yaml (shipped)"
        assert (config.pool.kind, config.train.scale, config.eval.suite) == ("from-datacomp", scale, "datacomp38")
        assert (config.score.model, config.score.pretrained) == ("ViT-L-14", "datacomp_xl_s13b_b90k")
        assert config.filter.recipe["steps"] == [
            {"clip_score": {"model_id": "${model_id}", "fraction": "${fraction}"}}
        ]
        assert stage_names(config) == ["pool", "score", "filter", "reshard", "train", "eval"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.yaml", {"pool": {"kind": "import", "src": "my_images"}})
    config, _ = load_run_config(str(path))
    assert config.pool.src == str(tmp_path / "my_images")
    assert config.submit.leaderboard == "${run}/leaderboard.db"  # the run directory, known when the run starts


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"pool.scael": "xs"},
            "pool.scael: unknown key (allowed here: kind, scale, seed, num_samples, shard_size, path)",
        ),
        ({"trian": {"scale": "xs"}}, "trian: unknown key (allowed here: name, description"),
        ({"train.scale": "huge"}, "train.scale: unknown scale 'huge'; choose one of xs, tiny, small"),
        ({"train": None}, "train: required, but missing"),
        (
            {"pool.kind": "ftp"},
            "pool: unknown kind 'ftp'; choose one of synth, import, download, from-datacomp, existing",
        ),
        ({"reshard.shard_size": 0}, "reshard.shard_size: Input should be greater than 0"),
        ({"filternet": None}, "score.model is `filternet` but there is no `filternet:` section"),
        (
            {"score.pretrained": "openai"},
            "model: filternet scores with this run's filtering network; leave out `pretrained`",
        ),
        (
            {"filter.recipe": "synth_clip_scor"},
            "filter.recipe: recipe synth_clip_scor: no such file, and no shipped recipe of that name",
        ),
        (
            {"filter.set": {"fractoin": 0.2}},
            "filter.recipe: recipe synth_clip_score.yaml (shipped): filter.set.fractoin=...: the recipe has no "
            "variable 'fractoin'",
        ),
        (
            {"filter.recipe": {"steps": [{"clip_scor": {"fraction": 0.3}}]}, "filter.set": {}},
            "filter.recipe: recipe (inline), step 1: unknown filter 'clip_scor'",
        ),
        ({"eval.suite": "imagenet"}, "eval.suite: unknown suite 'imagenet'"),
        ({"train.mix": [{"path": "byod", "weight": 2}]}, "train.mix adds data of your own: that is the byod track"),
    ],
)
def test_bad_configs_name_the_file_and_the_field(tmp_path: Path, change: dict, message: str) -> None:
    path = write_config(tmp_path / "bad.yaml", change)
    error = error_of(path)
    assert error.startswith(f"{path}: ") and message in error, error


def test_not_yaml_and_missing_files_are_clear(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("pool: [unclosed\n")
    assert "broken.yaml: not valid YAML" in error_of(tmp_path / "broken.yaml")
    with pytest.raises(RunConfigError, match="no such run config file, and no shipped config of that name"):
        load_run_config(str(tmp_path / "nothing.yaml"))


def test_cli_reports_a_bad_config_without_a_traceback_and_checks_a_good_one(tmp_path: Path) -> None:
    bad = clipsift(
        "run", str(write_config(tmp_path / "bad.yaml", {"train.scale": "huge"})), "--out", str(tmp_path / "run")
    )
    _, stderr = bad.communicate(timeout=300)
    assert (
        bad.returncode == 2 and "bad.yaml: train.scale: unknown scale 'huge'" in stderr and "Traceback" not in stderr
    )
    assert not (tmp_path / "run").exists()
    good = clipsift("run", "tiny", "--check")
    _, stderr = good.communicate(timeout=300)
    assert good.returncode == 0, stderr
    assert "pool -> reference -> filternet -> score -> filter -> reshard -> train -> eval -> submit" in stderr
    assert load_run_config("tiny")[0].sha256() in stderr


def test_unset_environment_variables_stop_the_run_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATACOMP_SMALL", raising=False)
    config, where = load_run_config("datacomp_small")
    with pytest.raises(
        RunConfigError, match=r"not set \(pool.metadata: \$DATACOMP_SMALL; pool.shards: \$DATACOMP_SMALL"
    ):
        run_pipeline(config, tmp_path / "run", where=where)
    assert not (tmp_path / "run").exists()


def test_until_must_name_a_stage_of_the_config(tmp_path: Path) -> None:
    config, where = load_run_config(str(write_config(tmp_path / "xs.yaml", BASIC)))
    with pytest.raises(
        ClipsiftError, match=r"--until score: this config has no stage 'score' \(its stages: pool, filter, reshard"
    ):
        run_pipeline(config, tmp_path / "run", where=where, until="score")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- a run killed and resumed

# xs.yaml without the filtering network: the metadata-only basic recipe. The default test run stops it after
# reshard (no training: seconds); `-m slow` runs the whole chain (an xs training, evaluation, submission), and the
# slow test below and `clipsift demo --scale xs` in test_cli.py run it with the filtering network too.
BASIC = {
    "filternet": None,
    "score": None,
    "filter.recipe": "synth_basic",
    "filter.set": {},
    "submit.method_name": "basic (xs)",
}
EARLY = ("pool", "filter")
WHOLE = ("pool", "filter", "reshard", "train", "eval", "submit")


# About a minute for the whole chain on an idle 2-core machine; the timeout leaves room for a loaded one.
e2e = pytest.mark.timeout(2400)


@pytest.fixture(
    scope="module", params=["reshard", pytest.param(None, marks=pytest.mark.slow)], ids=["until-reshard", "whole"]
)
def xs_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The config run as a user runs it, on Ray, SIGKILLed once its filter stage is recorded complete, then run
    again (in-process, the default for a pool this small); up to reshard, or whole."""
    until = request.param
    root = tmp_path_factory.mktemp("xs-run")
    config, run = write_config(root / "xs.yaml", BASIC), root / "run"
    limit = ["--until", until] if until else []
    for _ in range(3):  # up to reshard, the run may end (about 2 s after filter) before a starved poll kills it
        killed = _killed_after_filter(config, run, limit)
        if killed is not None:
            break
        shutil.rmtree(run)
    assert killed is not None, "the run ended before it could be killed, three times"
    mtimes = {
        path: path.stat().st_mtime_ns
        for path in (
            run / "pool" / "pool.json",
            run / "subset.npy",
            run / "subset.json",
            *sorted((run / "pool").rglob("*.parquet")),
        )
    }
    # in-process now (small work): resuming is the same
    second = clipsift("run", str(config), "--out", str(run), *limit)
    try:
        _, stderr = second.communicate(timeout=900)
    finally:
        _kill_group(second)
    assert second.returncode == 0, stderr[-4000:]
    stages = WHOLE[: WHOLE.index(until) + 1] if until else WHOLE
    return {"config": config, "run": run, "killed": killed, "mtimes": mtimes, "stderr": stderr, "stages": stages}


def _killed_after_filter(config: Path, run: Path, limit: list[str]) -> dict | None:
    """`clipsift run` on Ray, SIGKILLed once its filter stage is recorded complete: the stage book it left, or None
    when the run ended first."""
    first = clipsift("run", str(config), "--out", str(run), "--workers", "2", *limit)
    stages_file, deadline = run / STAGES_FILE, time.time() + 900
    try:
        while time.time() < deadline and first.poll() is None:
            stages = json.loads(stages_file.read_text())["stages"] if stages_file.exists() else {}
            if stages.get("filter", {}).get("status") == "complete":
                break
            time.sleep(0.05)
        if first.poll() is not None:
            _, stderr = first.communicate()
            assert first.returncode == 0, f"the run failed before it could be killed: {stderr[-3000:]}"
            return None
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        _kill_group(first)
    return json.loads(stages_file.read_text())["stages"]


def _kill_group(process: subprocess.Popen) -> None:
    """Ray processes a killed driver leaves behind (the process group is the one this test started)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@e2e
def test_a_killed_run_resumes_without_redoing_finished_stages(xs_run: dict) -> None:
    stages = json.loads((xs_run["run"] / STAGES_FILE).read_text())["stages"]
    assert sorted(stages) == sorted(xs_run["stages"])
    for name in EARLY:
        assert xs_run["killed"][name]["status"] == "complete"
        assert stages[name]["ended"] == xs_run["killed"][name]["ended"] and stages[name]["attempts"] == 1, name
    for path, mtime in xs_run["mtimes"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert all(record["status"] == "complete" for record in stages.values())
    table = xs_run["stderr"][xs_run["stderr"].rindex(": stages") :]
    status = {line.split()[0]: line for line in table.splitlines()[2:]}
    for name in EARLY:
        assert "done earlier" in status[name], table
    for name in xs_run["stages"][len(EARLY) :]:  # reshard may finish, or train start, before the kill lands
        if xs_run["killed"].get(name, {}).get("status") == "complete":
            assert "done earlier" in status[name] and stages[name]["ended"] == xs_run["killed"][name]["ended"], table
        else:
            assert " ran " in status[name] or (name in ("reshard", "train") and " resumed " in status[name]), table


def check_early_chain(run: Path) -> dict:
    """The provenance record holds for pool, filter and reshard, and every hash in it matches the file it names."""
    provenance = json.loads((run / "provenance.json").read_text())
    stages = provenance["stages"]
    assert provenance["ok"] and all(check["ok"] for check in provenance["checks"]), provenance["checks"]
    assert stages["pool"]["pool_json_sha256"] == sha256(run / "pool" / "pool.json")
    subset = json.loads((run / "subset.json").read_text())
    assert stages["filter"]["npy_sha256"] == sha256(run / "subset.npy") == subset["npy_sha256"]
    assert stages["filter"]["recipe"] == subset["recipe"]
    assert subset["pool_json_sha256"] == stages["pool"]["pool_json_sha256"]
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["subset_sha256"] == subset["npy_sha256"] and manifest["num_samples"] == subset["num_uids"]
    return provenance


def check_chain(run: Path, method_name: str) -> dict:
    """The whole chain's provenance record holds, and every hash in it matches the file it names."""
    provenance = check_early_chain(run)
    stages = provenance["stages"]
    subset = json.loads((run / "subset.json").read_text())
    run_json = json.loads((run / "train" / "run.json").read_text())
    assert run_json["data"][0]["subset_sha256"] == subset["npy_sha256"] and run_json["status"] == "complete"
    assert stages["train"]["weights_sha256"] == sha256(run / "train" / "checkpoints" / "epoch_latest.pt")
    summary = json.loads((run / "train" / "eval" / "summary.json").read_text())
    assert summary["model"]["weights_sha256"] == stages["train"]["weights_sha256"]
    assert provenance["result"]["average"] == summary["suites"]["tiny"]["average"] == stages["eval"]["average"]
    assert summary["suites"]["tiny"]["complete"] and stages["eval"]["summary_sha256"] == sha256(
        run / "train" / "eval" / "summary.json"
    )
    with sqlite3.connect(run / "leaderboard.db") as db:
        table = next(
            row[0] for row in db.execute("select name from sqlite_master where type='table'") if "submission" in row[0]
        )
        rows = db.execute(f"select id, method_name from {table}").fetchall()
    assert rows == [(stages["submit"]["id"], method_name)]
    return provenance


@e2e
def test_provenance_ties_the_score_to_pool_recipe_and_subset(xs_run: dict) -> None:
    if xs_run["stages"] == WHOLE:
        provenance = check_chain(xs_run["run"], "basic (xs)")
        assert len(provenance["checks"]) == 13
    else:
        provenance = check_early_chain(xs_run["run"])
        assert sorted(provenance["stages"]) == sorted(xs_run["stages"]) and provenance["result"] is None
        assert len(provenance["checks"]) == 8  # pool 1, filter 4, reshard 3
    assert provenance["stages"]["filter"]["recipe"]["name"] == "synth_basic"


@e2e
def test_a_changed_config_is_refused_naming_the_stage_and_field(xs_run: dict) -> None:
    before = {name: (xs_run["run"] / name).read_bytes() for name in (STAGES_FILE, "config.yaml")}
    changed = write_config(
        xs_run["run"].parent / "changed.yaml",
        {
            **BASIC,
            "filter.set": {"fraction": 0.2},
            "filter.recipe": "synth_clip_score",
            "score": {"model": "clipsift-xs", "pretrained": "w.pt"},
        },
    )
    with pytest.raises(RunConfigError) as caught:
        run_pipeline(load_run_config(str(changed))[0], xs_run["run"])
    message = str(caught.value)
    assert "stage filter was completed with other settings than the config has now" in message
    assert "recipe: 'synth_basic' -> 'synth_clip_score'" in message and "set.fraction: (unset) -> 0.2" in message
    shards = write_config(xs_run["run"].parent / "shards.yaml", {**BASIC, "reshard.shard_size": 512})
    with pytest.raises(
        RunConfigError,
        match=r"stage reshard was completed with other settings than the config has now \(shard_size: 1024 -> 512\)",
    ):
        run_pipeline(load_run_config(str(shards))[0], xs_run["run"])
    if "train" in xs_run["stages"]:
        scale = write_config(xs_run["run"].parent / "scale.yaml", {**BASIC, "train.scale": "tiny"})
        with pytest.raises(
            RunConfigError,
            match=r"stage train was completed with other settings than the config has now \(scale: 'xs' -> 'tiny'\)",
        ):
            run_pipeline(load_run_config(str(scale))[0], xs_run["run"])
    assert {name: (xs_run["run"] / name).read_bytes() for name in before} == before


@e2e
def test_a_finished_run_rerun_from_its_config_copy_does_nothing(xs_run: dict) -> None:
    import ray

    run, stages = xs_run["run"], xs_run["stages"]
    before = (run / STAGES_FILE).read_bytes()
    config, where = load_run_config(str(run / "config.yaml"))
    assert config == load_run_config(str(xs_run["config"]))[0]
    result = run_pipeline(config, run, where=where, until=stages[-1])
    assert [t.status for t in result.times] == ["done earlier"] * len(stages) and result.provenance["ok"]
    assert (run / STAGES_FILE).read_bytes() == before and not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_xs_chain_with_a_filtering_network(tmp_path: Path) -> None:
    """configs/runs/xs.yaml whole: the filtering network scores the pool, the top 30% by its CLIP score is trained
    on."""
    run = tmp_path / "run"
    process = clipsift("run", str(write_config(tmp_path / "xs.yaml")), "--out", str(run), "--workers", "2")
    try:
        _, stderr = process.communicate(timeout=1800)
    finally:
        _kill_group(process)
    assert process.returncode == 0, stderr[-4000:]
    provenance = check_chain(run, "clip score top 30% (filtering network, xs)")
    stages = provenance["stages"]
    assert stages["reference"]["pool_json_sha256"] == sha256(run / "reference" / "pool.json")
    assert (
        stages["filternet"]["weights_sha256"]
        == sha256(stages["filternet"]["checkpoint"])
        == stages["score"]["weights_sha256"]
    )
    assert stages["score"]["model_id"] == f"clipsift-xs__{stages['filternet']['weights_sha256'][:12]}"
    assert stages["filter"]["recipe"]["steps"] == [
        {"clip_score": {"model_id": stages["score"]["model_id"], "fraction": 0.3}}
    ]
    assert abs(stages["filter"]["num_uids"] - 0.3 * 4096) <= 2


def test_submit_stage_takes_the_submission_an_earlier_attempt_posted(tmp_path: Path) -> None:
    """A run killed after posting and before recording its submit stage posts again when re-run: the leaderboard
    refuses the duplicate and names the submission, which the stage records as the run's own."""
    from leaderboard_support import write_run

    config, where = load_run_config(str(write_config(tmp_path / "run.yaml", {"submit.method_name": "resumed"})))
    runner = Runner(config, tmp_path / "RUN", where)
    done = Outputs()
    done.put("train", TrainOutput(str(write_run(tmp_path / "train", seed=11)), "", "xs", "", "", 0, None, None))
    done.put("eval", EvalOutput("tiny", None, "", "", "", "", 0.0, True, 0, None))
    stage = runner.stage("submit")
    first, again = stage.run(done), stage.run(done)
    assert (first.found_existing, again.found_existing) == (False, True)
    assert again.id == first.id and again.leaderboard == first.leaderboard == str(tmp_path / "RUN" / "leaderboard.db")
    assert stage.detail(again, done).endswith("(there already: same subset, scale and results)")
