"""The evaluation task types, one class per module, and their lookup by name (see `base` for adding one).

This is the one place that imports the type modules (`TYPE_MODULES`); each registers its class in
`base.REGISTRY` as it is imported, so their order is the order error messages list the types in.
"""

from __future__ import annotations

import importlib

from clipsift import ClipsiftError
from clipsift.eval.task_types.base import REGISTRY, Record, TaskType, register

TYPE_MODULES = (
    "classification",
    "retrieval",
    "winogavil",
    "multiobjective",
    "multilabel",
)  # eval/task_types/<module>.py
for _module in TYPE_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "Record", "TaskType", "get", "names", "register"]


def names() -> tuple[str, ...]:
    """The registered type names, in registration order."""
    return tuple(REGISTRY)


def get(name: str | TaskType, where: str = "") -> TaskType:
    """The task type a suite's `type: NAME` means (a type is itself).

    An unknown name is a ClipsiftError that lists the known ones; `where` starts it.
    """
    if isinstance(name, TaskType):
        return name
    kind = REGISTRY.get(name)
    if kind is None:
        prefix = f"{where}: " if where else ""
        raise ClipsiftError(
            f"{prefix}type: {name!r} is not one of {', '.join(REGISTRY)} (a worst-group "
            "classification is `classification` with a group column, see docs/evaluation.md)"
        )
    return kind
