"""The `clipsift` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from clipsift.pipeline.pool import Pool


def clipsift(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}  # no line wrapping inside messages
    return subprocess.run([sys.executable, "-m", "clipsift", *args], capture_output=True, text=True, timeout=600, env=env)


def test_help_lists_the_verbs() -> None:
    result = clipsift("--help")
    assert result.returncode == 0
    for verb in ("pool", "demo"):
        assert verb in result.stdout
    pool_help = clipsift("pool", "--help")
    for verb in ("synth", "import", "check"):
        assert verb in pool_help.stdout


def test_synth_prints_a_summary_and_writes_the_pool(tmp_path: Path) -> None:
    result = clipsift("pool", "synth", "--out", str(tmp_path / "pool"), "--num-samples", "60", "--shard-size", "25", "--workers", "1")
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


def test_demo_runs_the_chain_offline(tmp_path: Path) -> None:
    """The README's main command: synth -> check -> filter -> reshard -> train xs -> eval tiny, on Ray."""
    result = clipsift("demo", "--out", str(tmp_path / "demo"), "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    demo = tmp_path / "demo"
    assert Pool(str(demo / "pool")).info["num_samples"] == 4096
    assert Pool(str(demo / "reference")).info["num_samples"] == 2048
    subset = json.loads((demo / "subset.json").read_text())
    assert 0 < subset["num_uids"] < 4096
    manifest = json.loads((demo / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == subset["num_uids"] and manifest["subset_sha256"] == subset["npy_sha256"]
    run = json.loads((demo / "run" / "run.json").read_text())
    assert run["status"] == "complete" and run["data"][0]["subset_sha256"] == subset["npy_sha256"]
    summary = json.loads((demo / "run" / "eval" / "summary.json").read_text())["suites"]["tiny"]
    values = [task["value"] for task in summary["tasks"].values()]
    assert summary["complete"] and len(values) == 8 and abs(summary["average"] - sum(values) / 8) < 1e-9
    assert f"average {summary['average']:.3f}" in result.stderr
