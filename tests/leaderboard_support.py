"""Helpers for the leaderboard tests: run directories in the real formats and a real server process."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from clipsift import __version__
from clipsift.eval import aggregate
from clipsift.eval.registry import Suite, load_suite
from clipsift.train.recipe import load_recipe

NOW = "2026-01-01T00:00:00Z"


def write_run(
    run: Path,
    *,
    seed: int = 0,
    scale: str = "xs",
    suite: Suite | None = None,
    values: dict[str, float] | None = None,
    subset_size: int = 3000,
    sources: int = 1,
) -> Path:
    """A trained and evaluated run: run.json (train/launch.py's record), eval/results.jsonl and eval/summary.json
    (eval/run.py's lines, eval/aggregate.py's summary). Values are drawn from `seed` unless given."""
    suite = suite or load_suite("tiny")
    rng = random.Random(seed)
    values = values or {t.key: round(rng.uniform(0.05, 0.95), 6) for t in suite.tasks}
    recipe = load_recipe(scale)
    model = {
        "arch": recipe.model,
        "checkpoint": str(run / "checkpoints" / "epoch_latest.pt"),
        "weights_sha256": hashlib.sha256(f"weights {seed}".encode()).hexdigest(),
    }
    (run / "eval").mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "task": t.key,
            "suite": suite.name,
            "metric": t.metric,
            "value": values[t.key],
            "metrics": {t.metric: values[t.key]},
            "n": t.size,
            "scored": t.scored,
            "model": model,
            "data": f"/data/{t.key}",
            "clipsift": __version__,
            "time": NOW,
            "seconds": 0.5,
        }
        for t in suite.tasks
        if t.key in values
    ]
    (run / "eval" / "results.jsonl").write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    results = {line["task"]: line for line in lines}
    summary = aggregate.summary(model, {suite.name: aggregate.suite_summary(suite, results)})
    (run / "eval" / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    data = []
    for index in range(sources):
        subset_sha = hashlib.sha256(f"subset {seed} {index}".encode()).hexdigest()
        manifest = {
            "format": "clipsift-shards/1",
            "pool": "/pools/xs",
            "pool_json_sha256": hashlib.sha256(b"pool").hexdigest(),
            "subset": f"/subsets/{seed}.npy",
            "subset_sha256": subset_sha,
            "subset_uids": subset_size,
            "missing_uids": 0,
            "num_samples": subset_size,
            "num_shards": 3,
            "shard_size": 1024,
            "shards": [{"path": f"shards/{i:08d}.tar", "num_samples": 1024} for i in range(3)],
            "clipsift_version": __version__,
            "created": NOW,
        }
        data.append(
            {
                "path": f"/shards/{seed}/{index}",
                "weight": 1.0,
                "num_shards": 3,
                "manifest": manifest,
                "subset_sha256": subset_sha,
            }
        )
    record = {
        "scale": scale,
        "recipe": recipe.to_dict(),
        "data": data,
        "seed": recipe.seed,
        "batch_plan": {
            "devices": 1,
            "per_device_batch": recipe.global_batch,
            "accum_freq": 1,
            "global_batch": recipe.global_batch,
        },
        "infrastructure": {"device": "cpu", "workers": 1, "torchcompile": False, "cuda_devices": []},
        "non_standard": {},
        "versions": {"clipsift": __version__, "open_clip": "3.3.0", "torch": "2.9.0"},
        "open_clip_train_args": ["--model", recipe.model],
        "started": NOW,
        "status": "complete",
        "ended": NOW,
        "samples_seen": recipe.samples_per_epoch * recipe.epochs,
        "final_loss": 3.1,
        "samples_per_second": 900.0,
        "checkpoint": model["checkpoint"],
    }
    (run / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`clipsift leaderboard serve` in a subprocess on a free loopback port, its log in a file."""

    def __init__(self, db_url: str, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable,
            "-m",
            "clipsift",
            "leaderboard",
            "serve",
            "--db",
            db_url,
            "--port",
            str(self.port),
            *args,
        ]
        self.handle = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/v1/suites", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.handle.close()


class PostgresDatabase:
    """A fresh, uniquely named database on the server of CLIPSIFT_TEST_POSTGRES, dropped by `drop()`."""

    def __init__(self, admin_url: str):
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.name = f"clipsift_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        self.url = sa.make_url(admin_url).set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def postgres_url_or_reason() -> tuple[str | None, str]:
    url = os.environ.get("CLIPSIFT_TEST_POSTGRES")
    if not url:
        return None, "CLIPSIFT_TEST_POSTGRES is not set (source .ci/services to start PostgreSQL and set it)"
    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as err:  # noqa: BLE001 - any failure to reach the server is a reason to skip
        return (
            None,
            f"PostgreSQL at CLIPSIFT_TEST_POSTGRES is unreachable: {type(err).__name__}: {str(err).splitlines()[0]}",
        )
    return url, ""


def payload_of(run: Path, **kwargs: Any) -> dict[str, Any]:
    from clipsift.leaderboard import build_submission

    return build_submission(str(run), **{"method_name": "m", **kwargs})
