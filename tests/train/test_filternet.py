"""The filtering network: trained on a clean reference set, loadable by `clipsift score`, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsift import ClipsiftError
from clipsift.cli import app
from clipsift.pipeline.score import resolve_model
from clipsift.pipeline.synth import synth_reference
from clipsift.train.filternet import MANIFEST, train_filternet


# An xs training (12,800 samples seen, about 30 s on 2 cores): run with `-m slow`, like every training of the suite.
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("filternet")
    synth_reference(str(root / "reference"), scale="xs", num_samples=512, shard_size=128, workers=1)
    return root, train_filternet(str(root / "reference"), str(root / "net"), scale="xs", workers=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_network_trains_on_every_reference_sample_and_scores_pools(trained) -> None:
    root, result = trained
    record = json.loads((root / "net" / MANIFEST).read_text())
    assert result.reference_samples == record["reference_samples"] == 512
    assert result.samples_seen == record["samples_seen"] == 12_800  # the xs recipe
    assert json.loads((result.run / "run.json").read_text())["status"] == "complete"
    spec = resolve_model(result.arch, str(result.checkpoint))  # what `clipsift score` loads
    assert spec.model_id == result.model_id == record["model_id"]
    assert spec.weights_sha256 == record["weights_sha256"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_finished_network_is_reused_and_a_different_one_refused(trained) -> None:
    root, result = trained
    stamp = result.checkpoint.stat().st_mtime_ns
    outcome = CliRunner().invoke(
        app,
        ["filternet", "train", "--reference", str(root / "reference"), "--out", str(root / "net"), "--scale", "xs"],
    )
    assert outcome.exit_code == 0, outcome.output
    assert result.model_id in outcome.output and "clipsift score POOL --model clipsift-xs" in outcome.output
    assert result.checkpoint.stat().st_mtime_ns == stamp  # nothing retrained
    with pytest.raises(ClipsiftError, match="trained on .* at scale xs"):
        train_filternet(str(root / "reference"), str(root / "net"), scale="tiny")


def test_a_folder_that_is_not_a_pool_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    with pytest.raises(ClipsiftError, match="not a clipsift pool"):
        train_filternet(str(tmp_path / "ref"), str(tmp_path / "net"))
