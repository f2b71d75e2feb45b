"""The evaluation suites: which tasks, their type, main metric, groups, source, size and chance.

A suite is a YAML file in configs/eval/ (`datacomp38`, `tiny`) or any path with the same schema.
This module loads and checks it; what a task's data looks like on disk is `data.py`'s business,
what its metrics mean is `metrics.py`'s.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from clipsift import ClipsiftError

SUITE_DIR = files("clipsift.configs") / "eval"
TASK_TYPES = ("classification", "retrieval", "winogavil", "multiobjective")


@dataclass(frozen=True)
class GroupSpec:
    """How a task's samples fall into groups for worst-group metrics (the `npy` metadata vector)."""

    fields: tuple[str, ...]
    group_by: str | None = None
    group_names: tuple[str, ...] | None = None  # names of the group values 0, 1, ... where known
    exclude: tuple[str, ...] = ()  # group names left out of the worst group (FMoW's "Other")
    name: str = "wg"  # metric suffix: acc_<name>, acc_top5_<name>

    @property
    def column(self) -> int:
        return self.fields.index(self.group_by)


@dataclass(frozen=True)
class Task:
    key: str
    type: str
    metric: str
    groups: tuple[str, ...]
    source: str
    size: int
    classes: int | None
    chance: float | None
    scored: bool = True
    metadata: GroupSpec | None = None

    @property
    def dirname(self) -> str:
        """The task's folder below the suite's data directory."""
        return self.key


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    download: str  # the command that fetches (or writes) the data, with DATA_DIR to fill in
    groups: dict[str, str]  # group tag -> label
    tasks: tuple[Task, ...]
    path: str = ""
    sha256: str = ""  # of the definition's canonical JSON: a suite is known by name and this hash

    @property
    def scored(self) -> list[Task]:
        return [t for t in self.tasks if t.scored]

    def task(self, key: str) -> Task:
        for task in self.tasks:
            if task.key == key:
                return task
        raise ClipsiftError(f"suite {self.name} has no task {key!r}")

    def group_tasks(self, group: str) -> list[Task]:
        """The scored tasks tagged with `group`."""
        return [t for t in self.scored if group in t.groups]

    def select(self, patterns: list[str] | None) -> list[Task]:
        """Tasks matching any pattern (a key, a glob such as 'vtab/*', or a group tag); all when None."""
        if not patterns:
            return list(self.tasks)
        chosen, unknown = [], []
        for pattern in patterns:
            hits = [t for t in self.tasks if fnmatch.fnmatchcase(t.key, pattern) or pattern in t.groups]
            if not hits:
                unknown.append(pattern)
            chosen += [t for t in hits if t not in chosen]
        if unknown:
            raise ClipsiftError(f"--tasks {', '.join(unknown)}: no such task or group in suite {self.name} "
                                f"(tasks: {', '.join(t.key for t in self.tasks)}; groups: {', '.join(self.groups)})")
        return [t for t in self.tasks if t in chosen]

    def download_command(self, data_dir: str) -> str:
        return self.download.replace("DATA_DIR", data_dir)


def suite_names() -> list[str]:
    return sorted(entry.name[: -len(".yaml")] for entry in SUITE_DIR.iterdir() if entry.name.endswith(".yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name (datacomp38, tiny) or a suite YAML file."""
    if os.path.exists(name_or_path):
        path, text = str(name_or_path), Path(name_or_path).read_text(encoding="utf-8")
    elif name_or_path in suite_names():
        entry = SUITE_DIR / f"{name_or_path}.yaml"
        path, text = str(entry), entry.read_text(encoding="utf-8")
    else:
        raise ClipsiftError(f"unknown suite {name_or_path!r}; choose one of {', '.join(suite_names())} or give a suite YAML file")
    try:
        return parse_suite(yaml.safe_load(text), path)
    except (KeyError, TypeError, ValueError) as err:
        raise ClipsiftError(f"{path}: not a valid suite file ({type(err).__name__}: {err})") from err


def parse_suite(data: dict[str, Any], path: str = "") -> Suite:
    groups = {str(k): str(v) for k, v in (data.get("groups") or {}).items()}
    tasks = tuple(_task(entry, groups) for entry in data["tasks"])
    keys = [t.key for t in tasks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate task keys {duplicates}")
    return Suite(str(data["suite"]), int(data.get("version", 1)), str(data["download"]), groups, tasks, path, definition_sha256(data))


def definition_sha256(data: dict[str, Any]) -> str:
    """The hash of a suite definition, independent of YAML formatting, comments and key order."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _task(entry: dict[str, Any], groups: dict[str, str]) -> Task:
    if entry["type"] not in TASK_TYPES:
        raise ValueError(f"task {entry['key']}: type {entry['type']!r} is not one of {TASK_TYPES}")
    unknown = [g for g in entry.get("groups") or [] if g not in groups]
    if unknown:
        raise ValueError(f"task {entry['key']}: groups {unknown} are not declared under `groups`")
    meta = entry.get("metadata")
    spec = None
    if meta:
        spec = GroupSpec(tuple(meta["fields"]), meta.get("group_by"), tuple(meta["group_names"]) if meta.get("group_names") else None,
                         tuple(meta.get("exclude") or ()), str(meta.get("name", "wg")))
        if spec.group_by is not None and spec.group_by not in spec.fields:
            raise ValueError(f"task {entry['key']}: group_by {spec.group_by!r} is not one of its fields {list(spec.fields)}")
        if spec.exclude and not spec.group_names:
            raise ValueError(f"task {entry['key']}: `exclude` names groups, so `group_names` is needed")
    return Task(
        key=str(entry["key"]), type=str(entry["type"]), metric=str(entry["metric"]), groups=tuple(entry.get("groups") or ()),
        source=str(entry["source"]), size=int(entry["size"]), classes=entry.get("classes"), chance=entry.get("chance"),
        scored=bool(entry.get("scored", True)), metadata=spec,
    )
