"""Server-side verification of a submission: nothing the client computed is trusted.

A submission must hold a result for every scored task of the suite it names (values in [0, 1],
each with the task's main metric); its averages are recomputed from the suite's registered
definition (`clipsift.eval.aggregate.suite_summary`, the one home of averaging) and a claimed
average that differs is refused; its scale must match the recipe run.json records (samples seen,
model); the filtering track needs the subset's hash and a size within the scale's pool; the byod
track needs a description of the data. Every refusal names the field and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from clipsift.eval.aggregate import suite_summary
from clipsift.eval.registry import Suite
from clipsift.leaderboard.db import canonical_json
from clipsift.leaderboard.schema import Rejected, SubmissionIn
from clipsift.train.recipe import SCALES, Recipe, load_recipe

recipe_of = lru_cache(maxsize=None)(load_recipe)  # the recipe files are fixed: parse each once per process

TOLERANCE = 1e-6  # claimed vs recomputed averages (JSON floats round-trip exactly; other clients may sum differently)
RECIPE_CHECKED = (
    "samples_seen",
    "model",
)  # a difference in these refuses the submission; in other fields it is flagged


def validation_problems(err: Any, drop: tuple[str, ...] = ("body",)) -> list[tuple[str, str]]:
    """pydantic's (or FastAPI's) validation errors as (dotted field, reason)."""
    problems = []
    for error in err.errors():
        loc = [str(part) for part in error["loc"] if part not in drop]
        problems.append((".".join(loc) or "body", error["msg"]))
    return problems


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
    fingerprint: str  # identical (subset hash, scale, suite, results) give the same value


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
    if problems:
        raise Rejected(problems)
    rows = [
        {"task": t.key, "metric": t.metric, "value": results[t.key]["value"], "scored": t.scored}
        for t in suite.tasks
        if t.key in results
    ]
    groups = {tag: group["value"] for tag, group in summary["groups"].items()}
    return Verified(rows, summary["average"], groups, non_standard, _fingerprint(submission, suite, rows))


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
    if abs(claimed.average - summary["average"]) > TOLERANCE:
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
        elif (value is None) != (group["value"] is None) or (
            value is not None and abs(value - group["value"]) > TOLERANCE
        ):
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
        return
    if submission.subset is None:
        problems.append(
            ("subset", "the filtering track needs the subset's sha256 and size (run.json's data records them)")
        )
        return
    if submission.subset.size > recipe.pool_size:
        problems.append(
            (
                "subset.size",
                f"{submission.subset.size:,} samples exceed the {recipe.scale} pool's {recipe.pool_size:,}",
            )
        )
    sources = submission.run.data
    if len(sources) != 1:
        problems.append(
            (
                "run.data",
                f"the filtering track trains on one subset of the scale's pool; this run has {len(sources)} data "
                + "sources: submit it to the byod track",
            )
        )
    elif sources[0].get("subset_sha256") != submission.subset.sha256:
        problems.append(
            ("subset.sha256", f"not the subset run.json's data records ({sources[0].get('subset_sha256')!r})")
        )


def _fingerprint(submission: SubmissionIn, suite: Suite, rows: list[dict[str, Any]]) -> str:
    key = {
        "subset": submission.subset.sha256 if submission.subset else None,
        "scale": submission.scale,
        "suite": suite.sha256,
        "results": [[row["task"], row["value"]] for row in rows],
    }
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()
