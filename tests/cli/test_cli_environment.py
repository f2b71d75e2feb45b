"""The CLI as a new user meets it: any working directory, and no Ray notices unless asked (issue 23, items 1 and 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def console_script() -> str:
    """The installed `clipsift` command (not `python -m`, which puts the working directory first on sys.path)."""
    beside = Path(sys.executable).with_name("clipsift")
    found = str(beside) if beside.exists() else shutil.which("clipsift")
    if not found:
        pytest.skip("the clipsift console script is not installed")
    return found


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    env.pop("RAY_AUTH_MODE", None)  # Ray's token-authentication notice is on: the CLI must keep it off the screen
    env.pop("CLIPSIFT_VERBOSE", None)
    return subprocess.run([console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


RAY_NOISE = ("Token authentication", "core_worker.cc", "pid=", "INFO worker.py", "Started a local Ray instance")


def test_ray_verbs_work_from_a_folder_holding_a_clipsift_directory(tmp_path: Path) -> None:
    """The parent of a clone named `clipsift`: its folder would shadow the package in Ray workers (a namespace
    package of the same name), so every task failed with `cannot import name 'ClipsiftError'`. A Ray verb run there
    works and is quiet by default; another, run elsewhere, shows Ray's lines with --verbose."""
    parent = tmp_path / "parent"
    (parent / "clipsift" / "pipeline").mkdir(parents=True)
    (parent / "clipsift" / "README.md").write_text("a clone's root: no __init__.py here\n")
    made = run(parent, "pool", "synth", "--scale", "xs", "--num-samples", "300", "--shard-size", "100",
               "--workers", "2", "--out", "pool")  # fmt: skip
    output = made.stdout + made.stderr
    assert made.returncode == 0, output
    assert "ImportError" not in output and "300" in output
    assert not [noise for noise in RAY_NOISE if noise in output], output  # a Ray cluster ran, quietly
    # from another folder: the set-up hook a shadowing folder needs costs each Ray job a round trip (about 4 s)
    checked = run(tmp_path, "--verbose", "pool", "check", str(parent / "pool"), "--workers", "2")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok" in checked.stdout + checked.stderr and "300" in checked.stdout + checked.stderr
    assert "Ray" in checked.stderr  # --verbose shows Ray's own start-up lines, hidden without it
