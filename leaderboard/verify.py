"""Server-side verification of a submission: nothing the client computed is trusted.

A submission must hold a result for every scored task of the suite it names (values in [0, 1],
each with the task's main metric); its averages are recomputed from the suite's registered
definition (`clipsift.eval.aggregate.suite_summary`, the one home of averaging) and a claimed
average that differs is refused; its scale must match the recipe run.json records (samples seen,
model); the filtering track needs the subset's hash and a size within the scale's pool; the byod
track needs a description of the data; the subset's size and the pool's hash must be what the run's
data manifest records. Every refusal names the field and why.

`check_submission` is the one entry point: the server's store path (`store.add_submission`, with the
database's suites) and `clipsift leaderboard verify` (`verify_document`, with the built-in suites,
no database) both call it. Only the duplicate check needs the database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from clipsift.eval.aggregate import suite_summary
from clipsift.eval.registry import Suite, load_suite, suite_names
from clipsift.leaderboard.client import RUN_FILES, file_sha256
from clipsift.leaderboard.schema import (
    EXPORT_FORMAT,
    SUBMISSION_FORMAT,
    Rejected,
    SubmissionIn,
    canonical_sha256,
    shown,
)
from clipsift.train.recipe import SCALES, Recipe, load_recipe

recipe_of = lru_cache(maxsize=None)(load_recipe)  # the recipe files are fixed: parse each once per process

TOLERANCE = 1e-6  # claimed vs recomputed averages (JSON floats round-trip exactly; other clients may sum differently)
RECIPE_CHECKED = (
    "samples_seen",
    "model",
)  # a difference in these refuses the submission; in other fields it is flagged


def validation_problems(err: Any, drop: tuple[str, ...] = ("body",)) -> list[tuple[str, str]]:
    """pydantic's (or FastAPI's) validation errors as (dotted field, reason).

    The schema's unstorable-value error (schema.raise_unstorable) carries every problem it found: each becomes
    its own (field, reason). Path parts that are not Unicode text (a key with a lone surrogate) are shown as
    their ASCII escape, so the refusal itself can be encoded.
    """
    problems = []
    for error in err.errors():
        loc = [part for part in error["loc"] if part not in drop]
        found = (error.get("ctx") or {}).get("problems") if error["type"] == "unstorable_value" else None
        for path, reason in found or [((), error["msg"] + _sent_as(error))]:
            problems.append((".".join(shown(part) for part in (*loc, *path)) or "body", reason))
    return problems


def _sent_as(error: dict[str, Any]) -> str:
    """For a number sent as a string or a boolean (refused: numbers are strict), what was sent instead."""
    sent = error.get("input")
    if error["type"] in ("float_type", "int_type") and isinstance(sent, (str, bool)):
        kind = "a boolean" if isinstance(sent, bool) else "a string"
        return f", not {kind}: send a JSON number" + (" (an integer)" if error["type"] == "int_type" else "")
    return ""


def parse_payload(payload: dict[str, Any]) -> SubmissionIn:
    try:
        return SubmissionIn.model_validate(payload)
    except ValidationError as err:
        raise Rejected(validation_problems(err)) from None


@dataclass(frozen=True)
class Verified:
    results: list[dict[str, Any]]  # suite order: {"task", "metric", "value", "scored"}
    average: float
    groups: dict[str, float | None]
    non_standard: dict[str, Any]
    fingerprint: str  # `fingerprint(...)`: the same entry gives the same value


class SuiteSource(Protocol):
    """Where registered suites come from: the server's `Database`, or `BuiltinSuites` offline."""

    def suite(self, name: str, sha256: str) -> Suite | None: ...

    def suites(self) -> Iterable[Any]: ...  # each with .name and .sha256


class BuiltinSuites:
    """The suites every server registers on start (configs/eval/*.yaml), without a database."""

    def __init__(self) -> None:
        self._by_sha256 = {suite.sha256: suite for suite in map(load_suite, suite_names())}

    def suite(self, name: str, sha256: str) -> Suite | None:
        suite = self._by_sha256.get(sha256)
        return suite if suite is not None and suite.name == name else None

    def suites(self) -> list[Suite]:
        return sorted(self._by_sha256.values(), key=lambda suite: suite.name)


def check_submission(submission: SubmissionIn, suites: SuiteSource) -> tuple[Suite, Verified]:
    """The verification every submission goes through (server and offline alike): its suite must be registered by
    name and definition hash, then `verify` checks it against that definition and its scale's recipe."""
    suite = suites.suite(submission.suite.name, submission.suite.sha256)
    if suite is None:
        known = ", ".join(f"{row.name} ({row.sha256[:12]})" for row in suites.suites())
        reason = (
            f"no suite {submission.suite.name!r} with sha256 {submission.suite.sha256[:12]}... is registered "
            f"(registered: {known}); an admin registers a custom suite with POST /api/v1/suites"
        )
        raise Rejected([("suite", reason)])
    return suite, verify(submission, suite)


def verify(submission: SubmissionIn, suite: Suite) -> Verified:
    """Check a parsed submission against its suite's registered definition and its scale's recipe."""
    problems: list[tuple[str, str]] = []
    results = _check_results(submission, suite, problems)
    summary = suite_summary(suite, results)
    if not problems:
        _check_averages(submission, suite, summary, problems)
    recipe = _check_scale(submission, problems)
    non_standard = _non_standard(submission, recipe)
    if recipe is not None:
        _check_data(submission, recipe, problems)
    _check_manifest(submission, problems)
    if problems:
        raise Rejected(problems)
    rows = [
        {"task": t.key, "metric": t.metric, "value": results[t.key]["value"], "scored": t.scored}
        for t in suite.tasks
        if t.key in results
    ]
    groups = {tag: group["value"] for tag, group in summary["groups"].items()}
    key = fingerprint(
        track=submission.track,
        scale=submission.scale,
        suite_sha256=suite.sha256,
        subset_sha256=submission.subset.sha256 if submission.subset else None,
        description=submission.description,
        results=rows,
    )
    return Verified(rows, summary["average"], groups, non_standard, key)


def _differs(claimed: float, recomputed: float) -> bool:
    """Farther apart than TOLERANCE; a non-finite value (which the schema refuses already) always differs."""
    return not (math.isfinite(claimed) and abs(claimed - recomputed) <= TOLERANCE)


def _check_results(
    submission: SubmissionIn, suite: Suite, problems: list[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    known = {t.key: t for t in suite.tasks}
    results: dict[str, dict[str, Any]] = {}
    for index, result in enumerate(submission.results):
        field = f"results.{index}"
        task = known.get(result.task)
        if task is None:
            problems.append((f"{field}.task", f"{result.task!r} is not a task of suite {suite.name}"))
        elif result.task in results:
            problems.append((f"{field}.task", f"{result.task} appears more than once"))
        elif result.metric != task.metric:
            problems.append((f"{field}.metric", f"{task.key} is scored by {task.metric}, not {result.metric}"))
        else:
            results[task.key] = {"value": result.value}
    given = {result.task for result in submission.results}  # a task given with a wrong metric is reported above
    missing = [t.key for t in suite.scored if t.key not in given]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        problems.append(
            (
                "results",
                f"no result for {len(missing)} of the {len(suite.scored)} scored tasks of suite {suite.name}: {shown}",
            )
        )
    return results


def _check_averages(
    submission: SubmissionIn, suite: Suite, summary: dict[str, Any], problems: list[tuple[str, str]]
) -> None:
    claimed = submission.averages
    if _differs(claimed.average, summary["average"]):
        reason = (
            f"{claimed.average!r} is not the mean of the {summary['num_evaluated']} scored tasks' values, "
            f"{summary['average']!r}"
        )
        problems.append(("averages.average", reason))
    for tag, value in claimed.groups.items():
        group = summary["groups"].get(tag)
        if group is None:
            problems.append(
                (
                    f"averages.groups.{tag}",
                    f"suite {suite.name} has no group {tag!r} (groups: {', '.join(suite.groups) or 'none'})",
                )
            )
        elif (value is None) != (group["value"] is None) or (value is not None and _differs(value, group["value"])):
            problems.append(
                (f"averages.groups.{tag}", f"{value!r} is not the mean of the group's tasks, {group['value']!r}")
            )


def _check_scale(submission: SubmissionIn, problems: list[tuple[str, str]]) -> Recipe | None:
    if submission.scale not in SCALES:
        problems.append(("scale", f"unknown scale {submission.scale!r}; choose one of {', '.join(SCALES)}"))
        return None
    recipe, run = recipe_of(submission.scale), submission.run
    if run.scale != submission.scale:
        problems.append(("run.scale", f"run.json says the run trained the {run.scale} scale, not {submission.scale}"))
    for key in RECIPE_CHECKED:
        if run.recipe.get(key) != getattr(recipe, key):
            problems.append(
                (
                    f"run.recipe.{key}",
                    f"{run.recipe.get(key)!r} is not the {recipe.scale} recipe's {getattr(recipe, key)!r}",
                )
            )
    if run.status != "complete":
        problems.append(
            ("run.status", f"the training run is {run.status!r}, not 'complete'; finish `clipsift train` first")
        )
    trained = recipe.samples_per_epoch * recipe.epochs
    if run.samples_seen != trained:
        problems.append(
            (
                "run.samples_seen",
                f"the run saw {run.samples_seen} samples; the {recipe.scale} recipe trains on {trained}",
            )
        )
    if submission.model.arch != recipe.model:
        problems.append(
            (
                "model.arch",
                f"the evaluated model is {submission.model.arch}; the {recipe.scale} scale trains {recipe.model}",
            )
        )
    return recipe


def _non_standard(submission: SubmissionIn, recipe: Recipe | None) -> dict[str, Any]:
    """run.json's own flags plus every other recipe number that differs from the scale's."""
    flags = dict(submission.run.non_standard)
    if recipe is not None:
        for key, value in recipe.to_dict().items():
            if key not in RECIPE_CHECKED and submission.run.recipe.get(key) != value:
                flags[f"recipe.{key}"] = submission.run.recipe.get(key)
    return flags


def _check_data(submission: SubmissionIn, recipe: Recipe, problems: list[tuple[str, str]]) -> None:
    if submission.track == "byod":
        if not (submission.description or "").strip():
            problems.append(
                (
                    "description",
                    "the byod track needs a description of the data (what it is, where it comes from, its size)",
                )
            )
    elif submission.subset is None:
        problems.append(
            ("subset", "the filtering track needs the subset's sha256 and size (run.json's data records them)")
        )
    else:
        if submission.subset.size > recipe.pool_size:
            problems.append(
                (
                    "subset.size",
                    f"{submission.subset.size:,} samples exceed the {recipe.scale} pool's {recipe.pool_size:,}",
                )
            )
        if len(submission.run.data) != 1:
            problems.append(
                (
                    "run.data",
                    f"the filtering track trains on one subset of the scale's pool; this run has "
                    f"{len(submission.run.data)} data sources: submit it to the byod track",
                )
            )


def _check_manifest(submission: SubmissionIn, problems: list[tuple[str, str]]) -> None:
    """The subset's hash and size and the pool's hash are the ones run.json's data records (train/launch.py writes
    each source's `subset_sha256` and its reshard manifest, whose `subset_uids` and `pool_json_sha256` they are)."""
    sources = submission.run.data
    if submission.subset is not None:
        index = next(
            (i for i, source in enumerate(sources) if source.get("subset_sha256") == submission.subset.sha256), None
        )
        if index is None:
            recorded = [source.get("subset_sha256") for source in sources]
            problems.append(("subset.sha256", f"not the subset run.json's data records ({_listed(recorded)})"))
            return
        manifest = _manifest(sources[index])
        size = manifest.get("subset_uids")
        if size != submission.subset.size or isinstance(size, bool):
            problems.append(
                (
                    "subset.size",
                    f"{submission.subset.size!r} is not the subset size run.json's data records "
                    f"(run.data.{index}.manifest.subset_uids: {size!r})",
                )
            )
        pool = manifest.get("pool_json_sha256")
        if submission.pool_sha256 != pool:
            problems.append(
                (
                    "pool_sha256",
                    f"{submission.pool_sha256!r} is not the pool run.json's data records "
                    f"(run.data.{index}.manifest.pool_json_sha256: {pool!r})",
                )
            )
    elif submission.pool_sha256 is not None:
        pools = [_manifest(source).get("pool_json_sha256") for source in sources]
        if submission.pool_sha256 not in pools:
            problems.append(("pool_sha256", f"not a pool run.json's data records ({_listed(pools)})"))


def _manifest(source: dict[str, Any]) -> dict[str, Any]:
    """A data source's reshard manifest; {} when the free-form run record holds something else there."""
    manifest = source.get("manifest")
    return manifest if isinstance(manifest, dict) else {}


def _listed(values: list[Any]) -> str:
    return ", ".join(repr(value) for value in values[:5]) + (" ..." if len(values) > 5 else "") or "none"


def quantised(value: float) -> int:
    """A value in units of TOLERANCE, rounded to the nearest (halves to even): 0.5, 0.5 + 1 ulp and 0.5 + 1e-9 are
    all 500000, and -0.0 is 0. Values closer than TOLERANCE nearly always share a unit; two that straddle a
    half-unit boundary (0.0000005 - 1e-12 and 0.0000005 + 1e-12) do not: it is a grid, not a distance."""
    return round(value / TOLERANCE)


def fingerprint(
    *,
    track: str,
    scale: str,
    suite_sha256: str,
    subset_sha256: str | None,
    description: str | None,
    results: list[dict[str, Any]],
) -> str:
    """What makes a leaderboard entry the same as another: track, scale, suite definition, subset hash, the scored
    tasks' values on the TOLERANCE grid (unscored tasks do not count) and, for the byod track, the description of
    the data (whitespace runs as one space). Computed alike from a submission and from a stored row."""
    key = {
        "fingerprint": 2,
        "track": track,
        "scale": scale,
        "suite": suite_sha256,
        "subset": subset_sha256,
        "data": " ".join((description or "").split()) if track == "byod" else None,
        "results": sorted([row["task"], quantised(row["value"])] for row in results if row.get("scored", True)),
    }
    return canonical_sha256(key)


# --------------------------------------------------------------------------- offline (clipsift leaderboard verify)

EXPORT_KEYS = ("format", "submission", "payload_sha256", "provenance")


@dataclass
class DocumentReport:
    """What `verify_document` found: every problem as (field, reason), and the verified submission when none."""

    problems: list[tuple[str, str]]
    submission: SubmissionIn | None = None
    suite: Suite | None = None
    verified: Verified | None = None
    payload_sha256: str | None = None
    export: bool = False  # an export (payload hash and provenance checked), not a bare payload


def verify_document(document: Any, run_dir: str | None = None, suites: SuiteSource | None = None) -> DocumentReport:
    """Verify an export (`clipsift submit --export`) or a bare submission payload as the server would, without one:
    the export's own hashes, then `parse_payload` and `check_submission` against `suites` (default: the built-in
    ones). With `run_dir`, the provenance hashes are compared with that run's files. Duplicates are not checked."""
    if not isinstance(document, dict):
        return DocumentReport([("file", f"expected a JSON object, not {type(document).__name__}")])
    problems: list[tuple[str, str]] = []
    export = document.get("format") == EXPORT_FORMAT
    if export:
        payload = document.get("submission")
        problems += [(shown(key), "not a field of an export") for key in document if key not in EXPORT_KEYS]
        problems += _check_envelope(document, payload, run_dir)
        prefix = "submission"
    elif document.get("format", SUBMISSION_FORMAT) == SUBMISSION_FORMAT:
        payload, prefix = document, ""
        if run_dir is not None:
            problems.append(("provenance", "a bare submission has no provenance hashes to compare with --run"))
    else:
        reason = f"{document.get('format')!r} is neither an export ({EXPORT_FORMAT}) nor a submission"
        return DocumentReport([("format", f"{reason} ({SUBMISSION_FORMAT})")])
    report = DocumentReport(problems, payload_sha256=canonical_sha256(payload), export=export)
    if not isinstance(payload, dict):
        problems.append((prefix or "file", "expected the submission, a JSON object"))
        return report
    try:
        report.submission = parse_payload(payload)
        report.suite, report.verified = check_submission(report.submission, suites or BuiltinSuites())
    except Rejected as err:
        problems += err.errors
    return report


def _check_envelope(document: dict[str, Any], payload: Any, run_dir: str | None) -> list[tuple[str, str]]:
    problems = []
    claimed, actual = document.get("payload_sha256"), canonical_sha256(payload)
    if claimed != actual:
        problems.append(
            (
                "payload_sha256",
                f"{claimed!r} is not the sha256 of the canonical submission ({actual}): the export was changed",
            )
        )
    files = (document.get("provenance") or {}).get("files") if isinstance(document.get("provenance"), dict) else None
    if not isinstance(files, dict):
        return [*problems, ("provenance.files", "missing: the sha256 of each of the run's files")]
    for name in RUN_FILES:
        recorded = files.get(name)
        if not (isinstance(recorded, str) and len(recorded) == 64):
            problems.append((f"provenance.files.{name}", f"{recorded!r} is not a sha256"))
        elif run_dir is not None:
            path = Path(run_dir) / name
            actual = file_sha256(path) if path.is_file() else None
            if actual != recorded:
                problems.append(
                    (f"provenance.files.{name}", f"{path} has sha256 {actual}, not the exported {recorded}")
                )
    return problems
