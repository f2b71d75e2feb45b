"""`clipsift run RUN.yaml`: a whole filtering-track job from one config, resumable stage by stage.

Stages, in order (those the config asks for): pool -> reference -> filternet -> score -> filter ->
reshard -> train -> eval -> submit. Each is a `clipsift.stage.Stage` class next to the code it runs
(listed in STAGES below); it calls the stage function of its module, which resumes per shard.
RUN/run-stages.json records, per stage, the settings that decide its results, the identity (sha256)
of what it read and what it wrote; it is written atomically when a stage starts and when it
completes. A re-run skips complete stages and continues the first unfinished one; a stage
whose recorded settings or inputs differ from the config's is an error (results never mix).
RUN/provenance.json, written at the end, ties the result to the pool, weights, recipe and subset by
hashes checked against the files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clipsift import ClipsiftError, __version__
from clipsift.eval.stage import EvalStage
from clipsift.files import open_fs, write_atomic, write_json_atomic
from clipsift.filters.stage import FilterStage
from clipsift.leaderboard.stage import SubmitStage
from clipsift.pipeline.parallel import default_workers
from clipsift.pipeline.run_config import RunConfig, RunConfigError, bind_run, unset_variables
from clipsift.pipeline.stages import PoolStage, ReferenceStage, ReshardStage, ScoreStage
from clipsift.stage import Outputs, RunContext, Stage, exists
from clipsift.train.stages import FilternetStage, TrainStage

STAGES_FILE = "run-stages.json"
PROVENANCE_FILE = "provenance.json"
CONFIG_COPY = "config.yaml"
STAGES_FORMAT = "clipsift-run-stages/1"
PROVENANCE_FORMAT = "clipsift-provenance/1"

STAGES: list[type[Stage]] = [
    PoolStage,
    ReferenceStage,
    FilternetStage,
    ScoreStage,
    FilterStage,
    ReshardStage,
    TrainStage,
    EvalStage,
    SubmitStage,
]  # the one list a new stage is added to, in run order
TITLES = {stage.name: stage.title for stage in STAGES}


def stage_classes(config: RunConfig) -> list[type[Stage]]:
    return [stage for stage in STAGES if stage.wanted(config)]


def stage_names(config: RunConfig) -> list[str]:
    return [stage.name for stage in stage_classes(config)]


@dataclass
class StageTime:
    stage: str
    status: str  # ran | resumed | done earlier
    seconds: float  # wall clock: this invocation (ran/resumed), or when it was done (done earlier)
    cpu_seconds: (
        float | None
    )  # CPU time of this process and the live processes it started (local Ray workers included)
    detail: str = ""


@dataclass
class RunResult:
    run_dir: Path
    config: RunConfig
    times: list[StageTime]
    outputs: Outputs
    provenance: dict[str, Any]
    seconds: float

    @property
    def average(self) -> float | None:
        evaluated = self.outputs.get(EvalStage)
        return evaluated.average if evaluated else None


# --------------------------------------------------------------------------- the stage book


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: dict[str, Any] = {}
        for key, item in value.items():
            items.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: value}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each field (dotted) that differs."""
    before, after = _flat(old), _flat(new)

    def show(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    return [
        f"{key}: {show(before, key)} -> {show(after, key)}"
        for key in sorted(set(before) | set(after))
        if (key in before, before.get(key)) != (key in after, after.get(key))
    ]


class StageBook:
    """RUN/run-stages.json: what each stage was run with, what it read and wrote, and when."""

    def __init__(self, run_dir: Path, config_sha256: str):
        self.fs, self.path = open_fs(str(run_dir / STAGES_FILE))
        self.run_dir = run_dir
        data = json.loads(self.fs.cat_file(self.path)) if self.fs.exists(self.path) else {}
        if data and data.get("format") != STAGES_FORMAT:
            raise ClipsiftError(
                f"{self.path}: format {data.get('format')!r}, expected {STAGES_FORMAT!r}; not a clipsift run directory"
            )
        self.data = {"format": STAGES_FORMAT, "stages": {}, **data, "config_sha256": config_sha256}

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def check(self, name: str, settings: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The stage's record, or an error when it was run with other settings or on other inputs."""
        record = self.stages.get(name)
        if record is None:
            return None
        what = "completed" if record["status"] == "complete" else "started"
        advice = f"results would mix: run this config with another --out, or delete {self.run_dir} to start over"
        changed = _differences(record["settings"], settings)
        if changed:
            raise RunConfigError(
                f"{self.path}: stage {name} was {what} with other settings than the config has now "
                f"({'; '.join(changed)}); {advice}"
            )
        changed = _differences(record["inputs"], inputs)
        if changed:
            raise RunConfigError(
                f"{self.path}: stage {name} was {what} on other inputs than the earlier stages give now "
                f"({'; '.join(changed)}); {advice}"
            )
        return record

    def start(self, name: str, settings: dict[str, Any], inputs: dict[str, Any]) -> None:
        previous = self.stages.get(name, {})
        self.stages[name] = {
            "status": "running",
            "settings": settings,
            "inputs": inputs,
            "started": _now(),
            "attempts": previous.get("attempts", 0) + 1,
        }
        self.save()

    def complete(self, name: str, outputs: dict[str, Any], seconds: float, cpu: float) -> None:
        self.stages[name].update(
            status="complete", outputs=outputs, seconds=round(seconds, 3), cpu_seconds=round(cpu, 3), ended=_now()
        )
        self.save()

    def save(self) -> None:
        write_json_atomic(self.fs, self.path, self.data)


# --------------------------------------------------------------------------- helpers


def cpu_times() -> dict[tuple[int, float], float]:
    """CPU seconds so far of this process and each live process it started (local Ray workers included), by (pid,
    start)."""
    import psutil

    times = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            used = process.cpu_times()
            times[(process.pid, process.create_time())] = (
                used.user + used.system + used.children_user + used.children_system
            )
        except psutil.Error:  # ended meanwhile
            continue
    return times


def cpu_since(before: dict[tuple[int, float], float]) -> float:
    """CPU seconds used since `before` by the processes alive now (one that ended meanwhile is not counted)."""
    return sum(used - before.get(key, 0.0) for key, used in cpu_times().items())


# --------------------------------------------------------------------------- the runner


class Runner:
    """Runs a config's stages in order: skips the complete ones, records each in the stage book, writes provenance."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        where: str,
        *,
        workers: int | None = None,
        on_stage: Callable[[str, str], None] | None = None,
    ):
        self.unbound = config
        self.run_dir = run_dir
        self.config = RunConfig.model_validate(
            bind_run(config.model_dump(mode="json"), str(run_dir)), context={"base": None}
        )
        self.where = where
        self.workers = workers or config.workers
        self.on_stage = on_stage or (lambda name, title: None)
        self.context = RunContext(run_dir, where, self.workers, self.config.address)
        self.stages = [cls(self.config, self.unbound, self.context) for cls in stage_classes(self.config)]
        self.outputs = Outputs()
        self.times: list[StageTime] = []

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def run(self, until: str | None = None) -> RunResult:
        started = time.perf_counter()
        book = StageBook(self.run_dir, self.unbound.sha256())
        names = [stage.name for stage in self.stages]
        if until is not None and until not in names:
            raise ClipsiftError(
                f"--until {until}: this config has no stage {until!r} (its stages: {', '.join(names)})"
            )
        for stage in self.stages:  # a changed config fails before any work (inputs are compared as each stage comes)
            if stage.name in book.stages:
                book.check(stage.name, stage.settings(), book.stages[stage.name]["inputs"])
        unset = unset_variables(self.unbound)
        if unset:
            raise RunConfigError(f"{self.where}: environment variables used in paths are not set ({'; '.join(unset)})")
        for stage in self.stages:
            stage.preflight()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config_copy()
        ran = self.stages if until is None else self.stages[: names.index(until) + 1]
        with default_workers(self.workers):  # score and anything else that is given no worker count
            for index, stage in enumerate(ran):
                self._stage(book, stage, f"{index + 1}/{len(names)}")
        provenance = self.provenance(ran)
        return RunResult(
            self.run_dir, self.config, self.times, self.outputs, provenance, time.perf_counter() - started
        )

    def _stage(self, book: StageBook, stage: Stage, position: str) -> None:
        settings, inputs = stage.settings(), stage.inputs(self.outputs)
        record = book.check(stage.name, settings, inputs)
        if record and record["status"] == "complete" and all(exists(f) for f in record["outputs"].get("files", [])):
            output = stage.output.from_record(record["outputs"])
            self.outputs.put(stage.name, output)
            self.times.append(
                StageTime(
                    stage.name,
                    "done earlier",
                    record["seconds"],
                    record.get("cpu_seconds"),
                    stage.detail(output, self.outputs),
                )
            )
            return
        self.on_stage(stage.name, f"{position} {stage.name}: {stage.title}")
        status = "resumed" if record else "ran"
        book.start(stage.name, settings, inputs)
        started, cpu = time.perf_counter(), cpu_times()
        output = stage.run(self.outputs)
        self.outputs.put(stage.name, output)
        seconds, cpu = time.perf_counter() - started, cpu_since(cpu)
        book.complete(stage.name, output.record(), seconds, cpu)
        self.times.append(StageTime(stage.name, status, seconds, cpu, stage.detail(output, self.outputs)))

    def _write_config_copy(self) -> None:
        text = yaml.safe_dump(self.unbound.model_dump(mode="json", exclude_none=True), sort_keys=False).encode()
        fs, path = open_fs(str(self.run_dir / CONFIG_COPY))
        write_atomic(fs, path, lambda handle: handle.write(text))

    def provenance(self, stages: list[Stage]) -> dict[str, Any]:
        """RUN/provenance.json: every stage's identities, each re-hashed from its file, and the links between them."""
        done = self.outputs
        checks = [
            {"check": c.what, "recorded": c.recorded, "actual": c.actual, "ok": c.recorded == c.actual}
            for stage in stages
            if stage.output and stage.name in done.by_name()
            for c in stage.checks(done.by_name()[stage.name], done)
        ]
        broken = [c for c in checks if not c["ok"]]
        evaluated = done.get(EvalStage)
        record = {
            "format": PROVENANCE_FORMAT,
            "run": self.config.name,
            "config": {"source": self.where, "sha256": self.unbound.sha256(), "copy": str(self.run_dir / CONFIG_COPY)},
            "result": (
                {"suite": evaluated.suite, "average": evaluated.average, "summary": evaluated.summary}
                if evaluated
                else None
            ),
            "stages": {
                name: {k: v for k, v in out.record().items() if k != "files"}
                for name, out in done.by_name().items()
                if name in {s.name for s in stages}
            },
            "checks": checks,
            "ok": not broken,
            "clipsift_version": __version__,
            "created": _now(),
        }
        fs, path = open_fs(str(self.run_dir / PROVENANCE_FILE))
        write_json_atomic(fs, path, record)
        if broken:
            raise ClipsiftError(
                f"{path}: the provenance chain is broken ({'; '.join(c['check'] for c in broken)}); "
                f"a file changed after its stage wrote it: delete {self.run_dir} and run again"
            )
        return record


# --------------------------------------------------------------------------- entry points


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / config.name


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path | None = None,
    *,
    where: str = "run config",
    workers: int | None = None,
    until: str | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunResult:
    """Run (or resume) every stage of `config` in `run_dir` (default: runs/NAME); see the module docstring."""
    run_dir = Path(run_dir or default_run_dir(config)).resolve()
    return Runner(config, run_dir, where, workers=workers, on_stage=on_stage).run(until)


def time_rows(result: RunResult) -> list[tuple[str, str, str, str, str]]:
    """(stage, status, wall seconds, CPU seconds, detail) per stage, plus the total of this invocation."""
    rows = [
        (
            t.stage,
            t.status,
            f"{t.seconds:,.1f}",
            f"{t.cpu_seconds:,.1f}" if t.cpu_seconds is not None else "-",
            t.detail,
        )
        for t in result.times
    ]
    ran = [t for t in result.times if t.status != "done earlier"]
    rows.append(
        (
            "total",
            "this invocation",
            f"{result.seconds:,.1f}",
            f"{sum(t.cpu_seconds or 0 for t in ran):,.1f}",
            f"stages {sum(t.seconds for t in ran):,.1f} s; the rest is start-up and checks",
        )
    )
    return rows
