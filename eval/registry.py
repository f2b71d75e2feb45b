"""The evaluation suites: which tasks, their type, main metric, groups, data, size and chance.

A suite is a YAML file in configs/eval/ (`datacomp38`, `tiny`) or any path with the same schema
(docs/evaluation.md, "Custom suites"). This module loads it and checks the definition (fields,
types, metrics) without touching any data; what a task's data looks like on disk is `data.py`'s
and `layouts.py`'s business, what its metrics mean is `metrics.py`'s. What each task type allows
(metrics, layouts, class names) its class says (`task_types`, looked up by `Task.kind`).
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
from clipsift.eval import task_types
from clipsift.eval.task_types import TaskType

SUITE_DIR = files("clipsift.configs") / "eval"
LAYOUTS = ("wds", "folder", "table")  # clip_benchmark's webdataset layout, one sub-folder per class, CSV/Parquet
SUITE_FIELDS = ("suite", "version", "download", "groups", "tasks")
REQUIRED_TASK_FIELDS = ("key", "type", "metric")
TASK_FIELDS = (
    *REQUIRED_TASK_FIELDS,
    "groups",
    "source",
    "size",
    "classes",
    "chance",
    "scored",
    "metadata",
    "data",
    "layout",
    "columns",
    "classnames",
    "templates",
    "include",
)
COLUMNS = (
    "image",
    "label",
    "caption",
    "group",
)  # table columns a task may name (`columns:`); defaults: their own names


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
class DataSpec:
    """Where a task's data is when the suite says so; absent, it is DATA_DIR/<key> in the webdataset layout."""

    path: str  # absolute (a relative `data:` is resolved against the suite file's folder)
    layout: str | None = None  # wds | folder | table; None: from the path (layouts.detect_layout)
    image: str = "image"  # table columns
    label: str = "label"
    caption: str = "caption"
    group: str | None = None
    named: tuple[str, ...] = ()  # the columns the suite names (only a table may name any)


@dataclass(frozen=True)
class Task:
    key: str
    type: str
    metric: str
    groups: tuple[str, ...] = ()
    source: str = ""
    size: int | None = None  # samples the data must hold; None: any number
    classes: int | None = None
    chance: float | None = None
    scored: bool = True
    metadata: GroupSpec | None = None
    data: DataSpec | None = None
    classnames: tuple[str, ...] | None = None  # override (or, for folders and tables, set) the class names
    templates: tuple[str, ...] | dict[str, tuple[str, ...]] | None = None  # a mapping: per-class prompts
    class_keys: tuple[str, ...] | None = (
        None  # folder names / label values of the classes, where they differ from the names
    )
    options: tuple[tuple[str, Any], ...] = ()  # the type's own fields (`TaskType.parse_fields`): recall_k, ...

    def option(self, name: str, default: Any = None) -> Any:
        """The value of one of the type's own fields (`default` when the type has no such field)."""
        return dict(self.options).get(name, default)

    @property
    def kind(self) -> TaskType:
        """The task's type: the class registered for its `type` name."""
        return task_types.get(self.type)

    @property
    def dirname(self) -> str:
        """The task's folder below the suite's data directory."""
        return self.key

    def location(self, data_dir: str) -> str:
        """The task's data: its own `data` path, else DATA_DIR/<key>."""
        return self.data.path if self.data else os.path.join(data_dir, self.dirname)


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
            raise ClipsiftError(
                f"--tasks {', '.join(unknown)}: no such task or group in suite {self.name} "
                f"(tasks: {', '.join(t.key for t in self.tasks)}; groups: {', '.join(self.groups)})"
            )
        return [t for t in self.tasks if t in chosen]

    def download_command(self, data_dir: str) -> str:
        return self.download.replace("DATA_DIR", data_dir)

    def where(self, task: Task | str, field: str | None = None) -> str:
        """'SUITE_FILE: task KEY: FIELD', the prefix of every error about a task's definition or data."""
        key = task.key if isinstance(task, Task) else task
        return f"{self.path or self.name}: task {key}" + (f": {field}" if field else "")


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
        raise ClipsiftError(
            f"unknown suite {name_or_path!r}; choose one of {', '.join(suite_names())} or give a suite YAML file"
        )
    try:
        return parse_suite(yaml.safe_load(text), path)
    except (KeyError, TypeError, ValueError) as err:
        raise ClipsiftError(f"{path}: not a valid suite file ({type(err).__name__}: {err})") from err


def parse_suite(data: dict[str, Any], path: str = "") -> Suite:
    """A suite from its definition (a YAML file's content); `path` names it in errors and anchors relative data paths.

    Only the definition is checked here (fields, types, metrics, groups); the data is checked by
    `layouts.check_suite_data` before an evaluation starts.
    """
    where = path or (str(data.get("suite", "suite")) if isinstance(data, dict) else "suite")
    if not isinstance(data, dict):
        raise ClipsiftError(f"{where}: a suite file is a mapping with {', '.join(SUITE_FIELDS)}")
    _check_fields(where, data, SUITE_FIELDS, ("suite", "tasks"))
    if not isinstance(data["tasks"], list) or not data["tasks"]:
        raise ClipsiftError(f"{where}: tasks: a suite needs a non-empty list of tasks")
    groups = {str(k): str(v) for k, v in (data.get("groups") or {}).items()}
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    entries, hashed = _expand_includes(where, data["tasks"], base)
    tasks = tuple(_task(where, number, entry, groups, base) for number, entry in enumerate(entries, 1))
    keys = [t.key for t in tasks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ClipsiftError(f"{where}: tasks: duplicate task keys {duplicates}")
    return Suite(
        str(data["suite"]),
        int(data.get("version", 1)),
        str(data.get("download") or ""),
        groups,
        tasks,
        path,
        definition_sha256({**data, "tasks": hashed}),  # an included task.yaml counts as if written out
    )


INCLUDED_PATHS = ("data", "classifiers")  # fields of an included entry that are paths relative to its own file


def _expand_includes(where: str, entries: list[Any], base: str) -> tuple[list[Any], list[Any]]:
    """Task entries with each `include: TASK.yaml` replaced by that file's entry (its own fields win), and the
    same with the included entries as written, for the definition's hash.

    An included entry's paths are relative to its own file (what `eval make-task` writes), so a task folder
    can move with its task.yaml.
    """
    expanded, hashed = [], []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or entry.get("include") is None:
            expanded.append(entry)
            hashed.append(entry)
            continue
        label = f"{where}: task {entry.get('key') or number}: include"
        included = _read_include(label, os.path.join(base, os.path.expanduser(str(entry["include"]))))
        own = {k: v for k, v in entry.items() if k != "include"}
        folder = os.path.dirname(os.path.abspath(os.path.join(base, os.path.expanduser(str(entry["include"])))))
        expanded.append({**_anchor(included, folder), **own})
        hashed.append({**included, **entry})
    return expanded, hashed


def _read_include(label: str, path: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ClipsiftError(
            f"{label}: cannot read {path} ({err.strerror or err}); include names a task.yaml (`eval make-task`)"
        ) from None
    if isinstance(loaded, list) and len(loaded) == 1:
        loaded = loaded[0]
    if not isinstance(loaded, dict):
        raise ClipsiftError(f"{label}: {path} holds no task entry (a mapping, or a list of one)")
    if "include" in loaded:
        raise ClipsiftError(f"{label}: {path} includes another file; an included entry cannot include")
    return loaded


def _anchor(entry: dict[str, Any], folder: str) -> dict[str, Any]:
    """The entry with its relative paths made absolute against `folder`."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str):
            return os.path.normpath(os.path.join(folder, os.path.expanduser(value)))
        if isinstance(value, list):
            return [absolute(v) for v in value]
        return value

    return {k: absolute(v) if k in INCLUDED_PATHS else v for k, v in entry.items()}


def definition_sha256(data: dict[str, Any]) -> str:
    """The hash of a suite definition, independent of YAML formatting, comments and key order."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_fields(where: str, entry: dict[str, Any], known: tuple[str, ...], required: tuple[str, ...]) -> None:
    unknown = [k for k in entry if k not in known]
    if unknown:
        raise ClipsiftError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(known)})")
    missing = [k for k in required if entry.get(k) is None]
    if missing:
        raise ClipsiftError(f"{where}: {missing[0]}: missing required field")


def _strings(where: str, value: Any, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, (str, int)) and str(v).strip() for v in value)
    ):
        raise ClipsiftError(f"{where}: {field}: a non-empty list of non-empty strings")
    return tuple(str(v).strip() for v in value)


def _task(suite: str, number: int, entry: Any, groups: dict[str, str], base: str) -> Task:
    if not isinstance(entry, dict):
        raise ClipsiftError(f"{suite}: task {number}: a task is a mapping with {', '.join(REQUIRED_TASK_FIELDS)}")
    where = f"{suite}: task {entry.get('key') or number}"
    type_fields = tuple(sorted({f for t in task_types.REGISTRY.values() for f in t.fields} - set(TASK_FIELDS)))
    _check_fields(where, entry, TASK_FIELDS + type_fields, REQUIRED_TASK_FIELDS)
    key, task_type, metric = str(entry["key"]), str(entry["type"]), str(entry["metric"])
    kind = task_types.get(task_type, where)
    foreign = [f for f in entry if f in type_fields and f not in kind.fields]
    if foreign:
        owners = " or ".join(t.name for t in task_types.REGISTRY.values() if foreign[0] in t.fields)
        raise ClipsiftError(f"{where}: {foreign[0]}: only {owners} tasks have this field, not {task_type}")
    options = kind.parse_fields(where, entry, base)
    unknown = [g for g in entry.get("groups") or [] if g not in groups]
    if unknown:
        raise ClipsiftError(f"{where}: groups: {unknown} are not declared under the suite's `groups`")
    spec = _group_spec(where, entry.get("metadata"))
    data = _data_spec(where, entry, kind, base)
    if data and data.group and spec:
        raise ClipsiftError(
            f"{where}: columns.group: a table's groups come from its group column; leave out `metadata`"
        )
    group_name = "wg" if data and data.group else spec.name if spec and spec.group_by else None
    allowed = kind.main_metrics(group_name, spec.fields if spec else (), **options)
    if metric not in allowed:
        hint = kind.metric_hint(group_name)
        raise ClipsiftError(
            f"{where}: metric: {metric!r} is not a metric of this {task_type} task; choose one of "
            f"{', '.join(allowed) or 'none (give metadata.fields)'}{hint}"
        )
    classnames, class_keys = _classnames(where, entry.get("classnames"))
    templates = _templates(where, entry.get("templates"))
    if classnames and len(set(classnames)) != len(classnames):
        raise ClipsiftError(
            f"{where}: classnames: {next(c for c in classnames if classnames.count(c) > 1)!r} appears twice"
        )
    if isinstance(templates, dict) and classnames:
        check_prompts(f"{where}: templates", list(classnames), templates)
    if templates and options.get("classifiers"):
        raise ClipsiftError(f"{where}: templates: the classifier comes from `classifiers`; leave out templates")
    if (classnames or templates) and not kind.suite_classnames:
        field = "classnames" if classnames else "templates"
        named = " or ".join(t.name for t in task_types.REGISTRY.values() if t.suite_classnames)
        raise ClipsiftError(f"{where}: {field}: only {named} tasks have class names and templates")
    size, classes = entry.get("size"), entry.get("classes")
    for field, value in (("size", size), ("classes", classes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ClipsiftError(f"{where}: {field}: a positive whole number (or leave it out)")
    if classnames and classes is not None and len(classnames) != classes:
        raise ClipsiftError(f"{where}: classes: {classes}, but classnames lists {len(classnames)}")
    return Task(
        key=key,
        type=task_type,
        metric=metric,
        groups=tuple(entry.get("groups") or ()),
        source=str(entry.get("source") or ""),
        size=size,
        classes=classes,
        chance=entry.get("chance"),
        scored=bool(entry.get("scored", True)),
        metadata=spec,
        data=data,
        classnames=classnames,
        templates=templates,
        class_keys=class_keys,
        options=tuple(options.items()),
    )


def _templates(where: str, value: Any) -> tuple[str, ...] | dict[str, tuple[str, ...]] | None:
    """Templates with {c} (a list), or per-class prompts (a mapping class name -> its prompts, used as written)."""
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k.strip() for k in value):
            raise ClipsiftError(f"{where}: templates: per-class prompts map each class name to a list of prompts")
        return {
            k.strip(): _strings(where, v if isinstance(v, list) else [v], f"templates.{k}") for k, v in value.items()
        }
    templates = _strings(where, value, "templates")
    if templates and any("{c}" not in t for t in templates):
        raise ClipsiftError(
            f"{where}: templates: {next(t for t in templates if '{c}' not in t)!r} has no {{c}} (the class name); "
            "per-class prompts are a mapping, class name -> prompts"
        )
    return templates


def check_prompts(where: str, classnames: list[str], prompts: dict[str, Any]) -> None:
    """Per-class prompts name every class and nothing else (`where` starts the error)."""
    missing = [c for c in classnames if c not in prompts]
    if missing:
        raise ClipsiftError(f"{where}: no prompts for class {missing[0]!r} (per-class prompts name every class)")
    extra = [c for c in prompts if c not in set(classnames)]
    if extra:
        shown = ", ".join(classnames[:10]) + (", ..." if len(classnames) > 10 else "")
        raise ClipsiftError(f"{where}: {extra[0]!r} is not one of the task's classes ({shown})")


def _classnames(where: str, value: Any) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """(names, keys): a list gives the names (which are also the keys), a mapping key -> name both."""
    if isinstance(value, dict):
        keys = tuple(str(k).strip() for k in value)
        return _strings(where, list(value.values()), "classnames"), keys
    return _strings(where, value, "classnames"), None


def _group_spec(where: str, meta: Any) -> GroupSpec | None:
    if not meta:
        return None
    if not isinstance(meta, dict) or not meta.get("fields"):
        raise ClipsiftError(f"{where}: metadata.fields: the names of the `npy` metadata vector's values are required")
    spec = GroupSpec(
        tuple(str(f) for f in meta["fields"]),
        meta.get("group_by"),
        tuple(str(n) for n in meta["group_names"]) if meta.get("group_names") else None,
        tuple(meta.get("exclude") or ()),
        str(meta.get("name", "wg")),
    )
    if spec.group_by is not None and spec.group_by not in spec.fields:
        raise ClipsiftError(
            f"{where}: metadata.group_by: {spec.group_by!r} is not one of its fields {list(spec.fields)}"
        )
    if spec.exclude and not spec.group_names:
        raise ClipsiftError(f"{where}: metadata.exclude: names groups, so `group_names` is needed")
    return spec


def _data_spec(where: str, entry: dict[str, Any], kind: TaskType, base: str) -> DataSpec | None:
    path, layout, columns = entry.get("data"), entry.get("layout"), entry.get("columns")
    if path is None:
        if layout not in (None, "wds") or columns:
            raise ClipsiftError(
                f"{where}: data: `{'layout' if layout else 'columns'}` needs the data's path in `data`"
            )
        return None
    if not isinstance(path, str) or not path.strip():
        raise ClipsiftError(f"{where}: data: the path of the task's data (a folder or a CSV/Parquet table)")
    if layout is not None and layout not in LAYOUTS:
        raise ClipsiftError(f"{where}: layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    columns = columns or {}
    if not isinstance(columns, dict) or any(k not in COLUMNS for k in columns):
        raise ClipsiftError(f"{where}: columns: a mapping of {', '.join(COLUMNS)} to the table's column names")
    if columns and layout not in (None, "table"):
        raise ClipsiftError(f"{where}: columns: only a table has columns (layout is {layout})")
    wrong = [f for f in columns if f not in kind.table_columns]
    if wrong:
        raise ClipsiftError(f"{where}: columns.{wrong[0]}: a {kind.name} task has no {wrong[0]} column")
    if kind.wds_only and layout not in (None, "wds"):
        raise ClipsiftError(f"{where}: layout: {kind.name} data is read only in the webdataset layout")
    resolved = os.path.join(base, os.path.expanduser(path))
    return DataSpec(
        os.path.normpath(resolved), layout, **{k: str(v) for k, v in columns.items()}, named=tuple(columns)
    )
