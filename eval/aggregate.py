"""summary.json: the averages of a run's results.jsonl per suite (overall and per group).

Every average is the plain mean of the main metrics of the scored tasks it covers that have a
result; a suite (or group) is `complete` only when all its scored tasks have one, and `missing`
lists the others. The leaderboard reads this file: docs/evaluation.md documents the schema.
"""

from __future__ import annotations

import time
from typing import Any

from clipsift import __version__
from clipsift.eval.registry import Suite, Task

SUMMARY_FORMAT = "clipsift-eval-summary/1"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _average(tasks: list[Task], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    done = [t.key for t in tasks if t.key in results]
    return {
        "value": _mean([float(results[k]["value"]) for k in done]),
        "tasks": done,
        "missing": [t.key for t in tasks if t.key not in results],
        "complete": len(done) == len(tasks),
    }


def suite_summary(
    suite: Suite, results: dict[str, dict[str, Any]], failed: dict[str, str] | None = None
) -> dict[str, Any]:
    """The summary of one suite from its results ({task key: results.jsonl line})."""
    overall = _average(suite.scored, results)
    return {
        "version": suite.version,
        "sha256": suite.sha256,
        "average": overall["value"],
        "complete": overall["complete"],
        "num_scored": len(suite.scored),
        "num_evaluated": len(overall["tasks"]),
        "missing": overall["missing"],
        "failed": dict(sorted((failed or {}).items())),
        "groups": {
            tag: {"label": label, **_average(suite.group_tasks(tag), results)} for tag, label in suite.groups.items()
        },
        "tasks": {
            t.key: {"metric": t.metric, "value": results[t.key]["value"], "scored": t.scored}
            for t in suite.tasks
            if t.key in results
        },
    }


def summary(
    model: dict[str, Any], suites: dict[str, dict[str, Any]], precision: dict[str, str] | None = None
) -> dict[str, Any]:
    """`precision`: what the model ran in, per part (`model.Precision.record`)."""
    return {
        "format": SUMMARY_FORMAT,
        "model": model,
        **({"precision": precision} if precision else {}),
        "suites": suites,
        "clipsift": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
