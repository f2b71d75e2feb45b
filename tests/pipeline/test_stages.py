"""The stage protocol and the pool-source registry: a new stage is one class in the runner's list, a new pool
source one registered class; the runner resumes, records and checks them like the shipped ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipsift.files import content_sha256
from clipsift.pipeline import run as run_module
from clipsift.pipeline.run import STAGES, run_pipeline, stage_names
from clipsift.pipeline.run_config import RunConfigError, validate_run_config
from clipsift.pipeline.sources import POOL, REFERENCE, kinds
from clipsift.pipeline.stages import PoolStage
from clipsift.settings import Section
from clipsift.stage import Check, Outputs, Stage, StageOutput, sha256_of


def config_for(where: Path, **sections: Any) -> dict[str, Any]:
    return {
        "name": "protocol",
        "pool": {"kind": "existing", "path": str(where)},
        "filter": {"recipe": "no_filter"},
        "train": {"scale": "xs"},
        "eval": {"suite": "tiny"},
        **sections,
    }


class CountSettings(Section):
    infra = frozenset({"chunk"})
    label: str = "rows"
    chunk: int = 1  # infrastructure: left out of what the stage book compares


@dataclass
class CountOutput(StageOutput):
    path: str
    rows: int
    sha256: str

    def files(self) -> list[str]:
        return [self.path]


class CountStage(Stage[CountOutput]):
    """A stage a contributor might add: counts the pool's rows into RUN/count.json."""

    name, title, output = "count", "count the pool's rows", CountOutput
    runs = 0

    def section(self, config: Any) -> Any:
        return CountSettings(label=config.description or "rows")

    def inputs(self, done: Outputs) -> dict[str, Any]:
        return {"pool": done[PoolStage].pool_json_sha256}

    def run(self, done: Outputs) -> CountOutput:
        type(self).runs += 1
        path = self.context.run_dir / "count.json"
        path.write_text(json.dumps({self.section(self.config).label: done[PoolStage].num_samples}))
        return CountOutput(str(path), done[PoolStage].num_samples, sha256_of(path))

    def detail(self, out: CountOutput, done: Outputs) -> str:
        return f"{out.rows} rows"

    def checks(self, out: CountOutput, done: Outputs) -> list[Check]:
        return [Check(f"count: sha256 of {out.path}", out.sha256, sha256_of(out.path))]


def test_a_new_stage_is_one_class_in_the_runners_list(
    small_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_module, "STAGES", [PoolStage, CountStage])
    config = validate_run_config(config_for(small_pool), "protocol.yaml", None)
    assert stage_names(config) == ["pool", "count"]
    CountStage.runs = 0
    first = run_pipeline(config, tmp_path / "run", workers=1)
    assert first.outputs[CountStage].rows == 10 and CountStage.runs == 1
    assert [t.status for t in first.times] == ["ran", "ran"] and first.times[1].detail == "10 rows"
    book = json.loads((tmp_path / "run" / "run-stages.json").read_text())["stages"]["count"]
    assert book["settings"] == {"label": "rows"} and book["inputs"] == {"pool": sha256_of(small_pool / "pool.json")}
    assert {"check": f"count: sha256 of {tmp_path / 'run' / 'count.json'}", "ok": True}.items() <= first.provenance[
        "checks"
    ][-1].items()

    again = run_pipeline(config, tmp_path / "run", workers=1)  # done: its typed output comes back from the book
    assert CountStage.runs == 1 and [t.status for t in again.times] == ["done earlier", "done earlier"]
    assert again.outputs[CountStage] == first.outputs[CountStage]

    changed = validate_run_config(config_for(small_pool, description="samples"), "protocol.yaml", None)
    with pytest.raises(
        RunConfigError, match=r"stage count was completed with other settings .*label: 'rows' -> 'samples'"
    ):
        run_pipeline(changed, tmp_path / "run", workers=1)


def test_the_shipped_stages_run_in_the_documented_order() -> None:
    assert [s.name for s in STAGES] == [
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
    assert len({s.output for s in STAGES}) == len(STAGES) - 1  # the reference set is a pool: the same output type


def test_the_pool_sources_are_registered_in_one_place() -> None:
    assert kinds(POOL) == ("synth", "import", "download", "from-datacomp", "existing")
    assert kinds(REFERENCE) == ("synth", "import", "existing")
    with pytest.raises(
        RunConfigError,
        match=r"pool: unknown kind 'ftp'; choose one of synth, import, download, "
        r"from-datacomp, existing",
    ):
        validate_run_config({**config_for(Path("x")), "pool": {"kind": "ftp"}}, "protocol.yaml", None)


NEW_SOURCE = textwrap.dedent('''
    import json, sys
    from typing import Literal
    from clipsift.pipeline.sources.base import POOL, PoolSource, register


    @register(POOL)
    class CopiedPool(PoolSource):
        """A source a contributor might add: a copy of another pool."""

        kind: Literal["copy"]
        of: str
        path: str | None = None

        def make(self, out, context):
            import shutil
            shutil.copytree(self.of, out, dirs_exist_ok=True)
            return {}


    from clipsift.pipeline.run import run_pipeline
    from clipsift.pipeline.run_config import validate_run_config

    config = json.loads(sys.argv[1])
    result = run_pipeline(validate_run_config(config, "copy.yaml", None), sys.argv[2], workers=1, until="pool")
    print(json.dumps(result.provenance["stages"]["pool"]))
''')


def test_a_new_pool_source_is_one_registered_class(small_pool: Path, tmp_path: Path) -> None:
    config = config_for(small_pool, pool={"kind": "copy", "of": str(small_pool)})
    done = subprocess.run(
        [sys.executable, "-c", NEW_SOURCE, json.dumps(config), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pool = json.loads(done.stdout.strip().splitlines()[-1])
    assert pool["kind"] == "copy" and pool["num_samples"] == 10 and pool["path"] == str(tmp_path / "run" / "pool")
    assert pool["pool_json_sha256"] == sha256_of(small_pool / "pool.json")
    copied = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert copied["pool"] == {"kind": "copy", "of": str(small_pool)}


def test_a_training_source_is_identified_by_its_manifest_without_timestamps(tmp_path: Path) -> None:
    from clipsift.train.stages import data_identity

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "m", "num_samples": 3, "created": "2026-12-02"}))
    assert data_identity(str(tmp_path)) == content_sha256({"format": "m", "num_samples": 3})
    assert data_identity(str(tmp_path / "missing")) is None


def test_a_run_configs_training_seed_reaches_training_and_is_recorded(
    small_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.seed goes to the training run (Infra.seed, which run.json records) and into the stage's output; left
    out, the recorded settings are those of runs made before the field existed, so such runs still resume."""
    from clipsift.pipeline.stages import ReshardOutput
    from clipsift.train import launch
    from clipsift.train.recipe import load_recipe
    from clipsift.train.stages import TrainStage

    seen = []

    def fake_train(scale, data, out, *, infra):
        seen.append(infra.seed)
        run = Path(out)
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text("{}")
        (run / "epoch_latest.pt").write_bytes(b"weights")
        return launch.TrainResult(run, run / "epoch_latest.pt", 10, 1, 0.5, 1.0, 0, 0.1)

    monkeypatch.setattr(launch, "train", fake_train)
    done = Outputs()
    done.put("reshard", ReshardOutput(str(small_pool), "", "", "", 10, 2, 0))
    for seed, recorded in ((7, 7), (None, load_recipe("xs").seed)):
        train = {"scale": "xs"} if seed is None else {"scale": "xs", "seed": seed}
        config = validate_run_config(config_for(small_pool, train=train), "seed.yaml", None)
        runner = run_module.Runner(config, tmp_path / f"run-{seed}", "seed.yaml")
        stage = runner.stage("train")
        assert isinstance(stage, TrainStage) and ("seed" in stage.settings()) == (seed is not None)
        assert stage.run(done).seed == recorded and seen[-1] == seed
    assert set(runner.stage("train").settings()) == {"scale", "subset_weight", "mix"}
