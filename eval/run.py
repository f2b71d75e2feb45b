"""`clipsift eval`: zero-shot evaluation of a run or checkpoint on a suite.

Each task's images are read, decoded and transformed by DataLoader workers and encoded in large
batches, each part in its precision (`model.Precision`: `auto` is DataComp's choice per part); its
metrics go to OUT/results.jsonl as one line, with the precision used, once the task is done
and OUT/summary.json is rewritten from all lines. A re-run skips the tasks already in
results.jsonl, so a killed evaluation resumes. A task whose data is missing fails with its name
and the download command; the other tasks go on. A task whose data is named in the suite file
(custom suites) is checked before any work: a missing file or a bad label stops the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import ClipsiftError, __version__
from clipsift.eval import aggregate
from clipsift.eval.data import EvalBatches, MissingData, Record, TaskData, count_samples
from clipsift.eval.layouts import check_suite_data, open_task
from clipsift.eval.model import EvalModel, load_model, resolve_target
from clipsift.eval.registry import Suite, Task, load_suite
from clipsift.files import file_sha256, open_fs, write_atomic, write_json_atomic

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CACHE = "cache"


@dataclass
class TaskOutcome:
    task: str
    status: str  # done | skipped | failed
    value: float | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class EvalResult:
    out: str
    suite: str
    outcomes: list[TaskOutcome] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[TaskOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def default_data_dir(suite: str) -> str:
    """$CLIPSIFT_EVAL_DATA/<suite>, else ~/.cache/clipsift/eval/<suite>."""
    base = os.environ.get("CLIPSIFT_EVAL_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "clipsift", "eval")
    return os.path.join(base, suite)


def default_workers() -> int:
    import torch

    return min(16, max(1, (os.cpu_count() or 2) - 2)) if torch.cuda.is_available() else 0


def evaluate(
    target: str,
    suite: str = "datacomp38",
    *,
    data_dir: str | None = None,
    tasks: list[str] | None = None,
    batch_size: int = 256,
    arch: str | None = None,
    out: str | None = None,
    workers: int | None = None,
    device: str | None = None,
    precision: str = "auto",
    save_classifiers: str | None = None,
    on_task: Callable[[TaskOutcome], None] | None = None,
) -> EvalResult:
    """Evaluate a run directory or a checkpoint file (with `arch`) on a suite; see the module doc.

    `precision`: auto (DataComp's choices per part, `model.resolve_precision`) | fp32 | bf16 | fp16;
    `save_classifiers`: a folder that gets each classification task's zero-shot classifier (KEY.npz).
    """
    resolved = resolve_target(target, arch, out)
    loaded = load_suite(suite)
    chosen = loaded.select(tasks)
    if data_dir is None:
        data_dir = default_data_dir(loaded.name)
        if loaded.name == "tiny" and not os.path.exists(os.path.join(data_dir, "suite.json")):
            from clipsift.eval.tiny import make_tiny_suite

            make_tiny_suite(data_dir)  # offline and deterministic: written on first use
    opened = check_suite_data(loaded, chosen, data_dir)
    model = load_model(resolved.arch, resolved.checkpoint, device=device, precision=precision)
    model.save_classifiers = save_classifiers
    return evaluate_model(
        model,
        loaded,
        chosen,
        data_dir,
        resolved.out,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        on_task=on_task,
        opened=opened,
    )


def evaluate_model(
    model: EvalModel,
    suite: Suite,
    tasks: list[Task],
    data_dir: str,
    out: str,
    *,
    batch_size: int = 256,
    workers: int = 0,
    on_task: Callable[[TaskOutcome], None] | None = None,
    opened: dict[str, TaskData] | None = None,
) -> EvalResult:
    """Evaluate `tasks` of `suite` that OUT/results.jsonl does not hold yet, one line per finished task.

    `opened`: tasks' data already opened (and checked) by `layouts.check_suite_data`.
    """
    if batch_size < 1:
        raise ClipsiftError(f"--batch-size {batch_size}: must be at least 1")
    fs, out = open_fs(out)
    fs.makedirs(out, exist_ok=True)
    lines = read_results(os.path.join(out, RESULTS), model.weights_sha256)
    _check_definition(os.path.join(out, RESULTS), suite, lines)
    _check_precision(os.path.join(out, RESULTS), model, lines)
    done = {(line["suite"], line["task"]) for line in lines}
    result, failed = EvalResult(out, suite.name), {}
    for task in tasks:
        if (suite.name, task.key) in done:
            outcome = TaskOutcome(task.key, "skipped")
        else:
            outcome = _run_and_record(
                model, suite, task, data_dir, out, batch_size, workers, lines, (opened or {}).get(task.key)
            )
            if outcome.error:
                failed[task.key] = outcome.error
        result.outcomes.append(outcome)
        result.summary = write_summary(out, model, lines, suite, failed)
        if on_task:
            on_task(outcome)
    if not tasks:
        result.summary = write_summary(out, model, lines, suite, failed)
    return result


def _run_and_record(
    model: EvalModel,
    suite: Suite,
    task: Task,
    data_dir: str,
    out: str,
    batch_size: int,
    workers: int,
    lines: list[dict[str, Any]],
    data: TaskData | None = None,
) -> TaskOutcome:
    """Evaluate one task and append its line; a bad-input error becomes a failed outcome, not an exception."""
    started = time.perf_counter()
    try:
        line = run_task(model, suite, task, data_dir, batch_size, workers, os.path.join(out, CACHE), data)
    except MissingData as err:
        fetch = (
            f"get the data with `{suite.download_command(data_dir)}`"
            if suite.download
            else "put the task's data there (`clipsift eval make-task`) or name it with `data:` in "
            f"{suite.path or suite.name}"
        )
        return TaskOutcome(
            task.key, "failed", error=f"{task.key}: {err}; {fetch}", seconds=time.perf_counter() - started
        )
    except ClipsiftError as err:
        return TaskOutcome(task.key, "failed", error=f"{task.key}: {err}", seconds=time.perf_counter() - started)
    line["seconds"] = round(time.perf_counter() - started, 3)
    append_result(os.path.join(out, RESULTS), line)
    lines.append(line)
    return TaskOutcome(task.key, "done", line["value"], seconds=line["seconds"])


def eval_summary_rows(result: EvalResult) -> list[tuple[str, object]]:
    """Rows for `ui.summary_table`: each task's main metric, the averages, where the files are."""
    rows: list[tuple[str, object]] = []
    tasks = result.summary["suites"][result.suite]["tasks"]
    for outcome in result.outcomes:
        if outcome.status == "failed":
            rows.append((outcome.task, "failed (see above)"))
        else:
            note = "from results.jsonl" if outcome.status == "skipped" else f"{outcome.seconds:.1f} s"
            rows.append((outcome.task, f"{tasks[outcome.task]['metric']} {tasks[outcome.task]['value']:.4f} ({note})"))
    suite = result.summary["suites"][result.suite]
    state = "complete" if suite["complete"] else f"partial: {suite['num_evaluated']}/{suite['num_scored']} tasks"
    average = suite["average"]
    rows.append(("average", f"{average:.4f} ({state})" if average is not None else f"n/a ({state})"))
    for group in suite["groups"].values():
        if group["value"] is not None:
            rows.append(
                (
                    group["label"],
                    f"{group['value']:.4f}"
                    + (
                        ""
                        if group["complete"]
                        else f" ({len(group['tasks'])} of {len(group['tasks']) + len(group['missing'])})"
                    ),
                )
            )
    rows.append(("results", os.path.join(result.out, RESULTS)))
    return rows


# --------------------------------------------------------------------------- results files


def read_results(path: str, weights_sha256: str) -> list[dict[str, Any]]:
    """The lines of results.jsonl; refuses lines written for other weights."""
    if not os.path.exists(path):
        return []
    lines = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if not isinstance(line, dict) or not {"suite", "task", "value"} <= set(line):
            raise ClipsiftError(f"{path}:{number} is not a results line; move the file away to re-evaluate") from None
        other = (line.get("model") or {}).get("weights_sha256")
        if other != weights_sha256:
            raise ClipsiftError(
                f"{path} holds results of other weights (sha256 {str(other)[:12]}, these are {weights_sha256[:12]}); "
                "move that eval folder away or pass --out to evaluate these weights"
            )
        lines.append(line)
    return lines


def _check_definition(path: str, suite: Suite, lines: list[dict[str, Any]]) -> None:
    """Refuse to resume on results of another definition of the suite (an edited suite file)."""
    other = next(
        (
            line
            for line in lines
            if line["suite"] == suite.name and line.get("suite_sha256") not in (None, suite.sha256)
        ),
        None,
    )
    if other is not None:
        raise ClipsiftError(
            f"{path} holds results of another definition of suite {suite.name} (sha256 {other['suite_sha256'][:12]}, "
            f"{suite.path or 'this one'} is {suite.sha256[:12]}); move that eval folder away or pass --out"
        )


def _check_precision(path: str, model: EvalModel, lines: list[dict[str, Any]]) -> None:
    """Refuse to resume on results computed in another precision setting or on another kind of device."""
    precision = getattr(model, "precision", None)
    if precision is None:
        return
    for line in lines:
        used = line.get("precision") or {}
        other = (used.get("setting"), used.get("device"))
        if used and other != (precision.setting, precision.device):
            raise ClipsiftError(
                f"{path} holds results computed with --precision {other[0]} on {other[1]} (task {line['task']}); "
                f"this run is --precision {precision.setting} on {precision.device}: pass --out, move that folder "
                "away or use the same precision and device"
            )


def append_result(path: str, line: dict[str, Any]) -> None:
    """Add one line to results.jsonl: the whole file is rewritten atomically, so no line is ever torn."""
    fs, local = open_fs(path)
    old = Path(local).read_bytes() if os.path.exists(local) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    data = old + json.dumps(line, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
    write_atomic(fs, local, lambda handle: handle.write(data))


def write_summary(
    out: str, model: EvalModel, lines: list[dict[str, Any]], current: Suite, failed: dict[str, str]
) -> dict[str, Any]:
    """Rewrite OUT/summary.json from all results lines (every suite they cover).

    A suite that is neither the current one nor shipped (a custom suite evaluated earlier into the
    same folder) keeps the entry its own run wrote.
    """
    fs, local = open_fs(os.path.join(out, SUMMARY))
    previous = json.loads(Path(local).read_text(encoding="utf-8")).get("suites", {}) if os.path.exists(local) else {}
    suites = {}
    for name in sorted({line["suite"] for line in lines} | {current.name}):
        suite = current if name == current.name else _load_known(name)
        if suite is None:
            if name in previous:
                suites[name] = previous[name]
            continue
        results = {line["task"]: line for line in lines if line["suite"] == name}
        suites[name] = aggregate.suite_summary(suite, results, failed if name == current.name else None)
    precision = getattr(model, "precision", None)
    data = aggregate.summary(model.describe(), suites, precision.record() if precision else None)
    write_json_atomic(fs, local, data)
    return data


def _load_known(name: str) -> Suite | None:
    try:
        return load_suite(name)
    except ClipsiftError:
        return None  # a suite given as a file path in another run


# --------------------------------------------------------------------------- tasks


def run_task(
    model: EvalModel,
    suite: Suite,
    task: Task,
    data_dir: str,
    batch_size: int,
    workers: int,
    cache_dir: str,
    data: TaskData | None = None,
) -> dict[str, Any]:
    """Evaluate one task (its data opened here unless given); its results.jsonl line."""
    data = data or open_task(suite, task, data_dir)
    values, n = task.kind.evaluate(model, task, data, batch_size, workers, cache_dir)
    value = values.get(task.metric)
    if value is None:
        raise ClipsiftError(f"{data.root}: the main metric {task.metric} is undefined for this data")
    return {
        "task": task.key,
        "suite": suite.name,
        "metric": task.metric,
        "value": float(value),
        "metrics": _clean(values),
        "n": n,
        "scored": task.scored,
        "suite_sha256": suite.sha256,
        "model": model.describe(),
        **_provenance(model, task),
        "data": data.root,
        "clipsift": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _provenance(model: EvalModel, task: Task) -> dict[str, Any]:
    """The precision a task ran in and the classifier files it loaded, for its results line."""
    precision = getattr(model, "precision", None)
    record: dict[str, Any] = {"precision": precision.record(task.kind.precision_parts)} if precision else {}
    files = task.option("classifiers")
    if files:
        record["classifiers"] = [{"path": path, "sha256": file_sha256(open_fs(path)[0], path)} for path in files]
        if "precision" in record:
            record["precision"]["classifier"] = "from the classifier files"
    return record


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe metrics: numpy scalars as Python numbers, NaN as None."""
    clean = {}
    for key, value in values.items():
        if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
            clean[key] = int(value)
        elif value is None or (isinstance(value, float) and np.isnan(value)):
            clean[key] = None
        else:
            clean[key] = float(value)
    return clean


def embed_images(
    model: EvalModel,
    task: Task,
    data: TaskData,
    batch_size: int,
    workers: int,
    with_meta: bool = False,
    *,
    part: str = "images",
    head: Callable | None = None,
) -> tuple[Any, list[Record]]:
    """Image embeddings in file order (all images of a sample consecutive) and the samples' records.

    `part`: the precision part the image tower runs in; `head`: applied to each batch's normalised features in
    that context (`EvalModel.encode_images`). Rows are numpy arrays, or torch tensors where `head` gives them.
    """
    import torch

    from clipsift.pipeline.ui import progress_bar

    dataset = EvalBatches(data, task.kind, model.pixels, batch_size, with_meta)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    options = {} if (part, head) == ("images", None) else {"part": part, "head": head}
    features, owners, slots, records = [], [], [], []
    with progress_bar() as progress:
        bar = progress.add_task(task.key, total=sample_total(task, data))
        for batch in loader:
            if len(batch["owner"]):
                features.append(model.encode_images(batch["images"], **options))
                owners.append(batch["owner"].numpy())
                slots.append(batch["slot"].numpy())
            records += batch["records"]
            progress.advance(bar, len(batch["records"]))
    if not records:
        raise MissingData(f"{data.root}: the tars hold no samples")
    order = np.lexsort((np.concatenate(slots), np.concatenate(owners)))
    records.sort(key=lambda r: r.index)
    if torch.is_tensor(features[0]):
        return torch.cat(features)[torch.from_numpy(order)], records
    return np.concatenate(features)[order], records


def sample_total(task: Task, data: TaskData) -> int:
    """The number of samples a task's progress bar counts to: the files, the suite's size, else the tars' count."""
    if data.files is not None:
        return len(data.files)
    return task.size if task.size is not None else count_samples(data.tars)


def check_size(task: Task, data: TaskData, n: int) -> None:
    """MissingData unless `data` holds the samples the suite says `task` has."""
    if task.size is not None and n != task.size:
        raise MissingData(
            f"{data.root} holds {n} samples, {task.key} has {task.size} (incomplete or another version of the data)"
        )
