"""The on-disk layouts a task's data may be in, all read as the same samples (docs/evaluation.md).

- `wds`: clip_benchmark's webdataset layout (`data.py`), the built-in suites' layout;
- `folder`: an image folder with one sub-folder per class (classification);
- `table`: a CSV/Parquet table of image paths (relative to the table's folder) with a label column
  (classification; a group column adds worst-group metrics) or a caption column (retrieval; the
  rows of one image, or a list cell, give it several captions).

`open_task` resolves a suite's task to its `TaskData`. An image folder or table becomes a list of
`FileSample`s whose members are exactly what a webdataset sample of the same data holds, so
`make_task`, which writes them into the webdataset layout, gives the same results and only loads
faster. Everything about the data is checked before any model work: `check_suite_data`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clipsift import ClipsiftError
from clipsift.eval import task_types
from clipsift.eval.data import (
    SPLIT,
    FileSample,
    MissingData,
    TaskData,
    finish_task,
    open_task_data,
    sample_key,
    write_tar,
    write_task_texts,
)
from clipsift.eval.registry import DataSpec, GroupSpec, Suite, Task, check_prompts, parse_suite
from clipsift.files import open_fs, write_atomic, write_json_atomic
from clipsift.pipeline.importer import FOLDER_IMAGE_EXTS, TABLE_FORMATS, read_table

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
TASK_BUILD = "make-task.json"
TASK_ENTRY = "task.yaml"
BUILD_FORMAT = "clipsift-task/1"

Where = Callable[[str], str]  # field -> "SUITE_FILE: task KEY: FIELD", the prefix of an error


def detect_layout(path: str) -> str:
    """wds for a folder with test/ (clip_benchmark), folder for another folder, table for a .csv/.parquet/... file."""
    if os.path.isdir(path):
        return "wds" if os.path.isdir(os.path.join(path, SPLIT)) else "folder"
    return "table"


def open_task(suite: Suite, task: Task, data_dir: str) -> TaskData:
    """The data of `task`: DATA_DIR/<key> (MissingData when absent) or the task's own `data`, checked."""
    return open_spec(task, data_dir, lambda field: suite.where(task, field))


def check_suite_data(suite: Suite, tasks: list[Task], data_dir: str) -> dict[str, TaskData]:
    """Open every task that names its data, so a missing file or bad label stops the run before any work.

    Tasks in DATA_DIR are opened when they run: their data may be fetched meanwhile, and one that
    is missing fails alone with the command that gets it.
    """
    return {task.key: open_task(suite, task, data_dir) for task in tasks if task.data is not None}


def open_spec(task: Task, data_dir: str, where: Where) -> TaskData:
    """The data of `task`, every check made that needs no tar read; `where(field)` starts each error."""
    names, templates = _names(task), _templates(task)
    files = list(task.option("classifiers") or ())
    for path in files:
        if not os.path.isfile(path):
            raise ClipsiftError(f"{where('classifiers')}: {path} does not exist (write it with --save-classifiers)")
    opened = {"need_templates": not files, "where": where("templates")}
    if task.data is None:
        return open_task_data(task.location(data_dir), task.kind, names, templates, task.metadata, **opened)
    spec, layout = task.data, _layout(task, where)
    if layout == "wds":
        try:
            data = open_task_data(spec.path, task.kind, names, templates, task.metadata, **opened)
        except MissingData as err:
            raise ClipsiftError(f"{where('data')}: {err}") from None
        _check_counts(task, data, where)
        return data
    rows, metadata = (_read_folder(spec.path, where), None) if layout == "folder" else _read_table(task, spec, where)
    if task.kind.captioned:
        samples, classnames = _captioned(rows, spec, where), None
    else:
        samples, classnames = _labelled(task, rows, where)
        templates = templates or ([] if files else list(DEFAULT_TEMPLATES))
        if isinstance(templates, dict):
            check_prompts(where("templates"), classnames, templates)
    if task.size is not None and task.size != len(samples):
        raise ClipsiftError(f"{where('size')}: {spec.path} holds {len(samples)} samples, the suite says {task.size}")
    data = TaskData(spec.path, [], classnames, templates if classnames else None, files=samples, metadata=metadata)
    _check_counts(task, data, where)
    return data


def _layout(task: Task, where: Where) -> str:
    """The layout of the task's `data`, once the path exists and fits the task."""
    spec = task.data
    if not os.path.exists(spec.path):
        raise ClipsiftError(f"{where('data')}: {spec.path} does not exist")
    layout = spec.layout or detect_layout(spec.path)
    if spec.named and layout != "table":
        raise ClipsiftError(f"{where('columns')}: only a table has columns; {spec.path} is in the {layout} layout")
    kind = task.kind
    if layout != "wds" and kind.wds_only:
        raise ClipsiftError(
            f"{where('layout')}: {kind.name} data is read only in the webdataset layout; {spec.path} is a {layout}"
        )
    if layout == "folder" and not os.path.isdir(spec.path):
        raise ClipsiftError(
            f"{where('layout')}: {spec.path} is not a folder (an image folder has one sub-folder per class)"
        )
    if layout == "folder" and "folder" not in kind.layouts:
        holds = " or ".join(t.name for t in task_types.REGISTRY.values() if "folder" in t.layouts)
        raise ClipsiftError(f"{where('layout')}: an image folder holds {holds} data; give {kind.name} data as a table")
    if layout not in kind.layouts:
        raise ClipsiftError(
            f"{where('layout')}: {kind.name} data is read in the {' or '.join(kind.layouts)} layout; "
            f"{spec.path} is a {layout}"
        )
    return layout


def _check_counts(task: Task, data: TaskData, where: Where) -> None:
    if task.classes is not None and data.classnames is not None and task.classes != len(data.classnames):
        raise ClipsiftError(
            f"{where('classes')}: the data has {len(data.classnames)} classes, the suite says {task.classes}"
        )


def _names(task: Task) -> list[str] | None:
    return list(task.classnames) if task.classnames else None


def _templates(task: Task) -> list[str] | dict[str, list[str]] | None:
    """The suite's templates, or its per-class prompts (a mapping class name -> prompts)."""
    if isinstance(task.templates, dict):
        return {name: list(prompts) for name, prompts in task.templates.items()}
    return list(task.templates) if task.templates else None


# --------------------------------------------------------------------------- image folders and tables


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def _read_folder(root: str, where: Where) -> list[tuple[str, Any, Any]]:
    """(image path, class folder name, None) for every image below ROOT/<class>/, in path order."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ClipsiftError(
            f"{where('data')}: {root} has no sub-folders; an image folder has one sub-folder of images per class"
        )
    samples = []
    for name in classes:
        for folder, dirs, files in os.walk(os.path.join(root, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            samples += [(os.path.join(folder, f), name, None) for f in sorted(files) if _ext(f) in FOLDER_IMAGE_EXTS]
    if not samples:
        raise ClipsiftError(
            f"{where('data')}: {root} holds no images ({', '.join('.' + e for e in FOLDER_IMAGE_EXTS)}) "
            "in its class sub-folders; the task is empty"
        )
    return samples


def _read_table(task: Task, spec: DataSpec, where: Where) -> tuple[list[tuple[str, Any, Any]], GroupSpec | None]:
    """(image path, label or caption(s), group index) per row, and the groups' spec when there is a group column."""
    fmt = TABLE_FORMATS.get(_ext(spec.path))
    if fmt is None:
        raise ClipsiftError(
            f"{where('data')}: {spec.path} is not a table ({', '.join('.' + e for e in TABLE_FORMATS)}) "
            "or a folder; set `layout` if the name misleads"
        )
    fs, path = open_fs(spec.path)
    table = read_table(fs, path, fmt)
    value_field = task.kind.value_column
    wanted = {"image": spec.image, value_field: getattr(spec, value_field)}
    if spec.group:
        wanted["group"] = spec.group
    for field, column in wanted.items():
        if column not in table.column_names:
            raise ClipsiftError(
                f"{where('columns.' + field)}: {spec.path} has no column {column!r} "
                f"(its columns: {', '.join(table.column_names)})"
            )
    if table.num_rows == 0:
        raise ClipsiftError(f"{where('data')}: {spec.path} has no rows; the task is empty")
    columns = {field: table.column(column).to_pylist() for field, column in wanted.items()}
    base = os.path.dirname(spec.path)
    rows = []
    for row, image in enumerate(columns["image"]):
        value, group = columns[value_field][row], columns["group"][row] if spec.group else None
        for field, cell in (("image", image), (value_field, value), *((("group", group),) if spec.group else ())):
            if cell is None or (isinstance(cell, str) and not cell.strip()):
                raise ClipsiftError(f"{where('columns.' + field)}: row {row + 1} of {spec.path} has no {field}")
        if not isinstance(image, str):
            raise ClipsiftError(
                f"{where('columns.image')}: column {spec.image!r} of {spec.path} must hold image file paths"
            )
        rows.append((os.path.normpath(os.path.join(base, os.path.expanduser(image))), value, group))
    missing = [(row, image) for row, (image, _, _) in enumerate(rows) if not os.path.isfile(image)]
    if missing:
        raise ClipsiftError(
            f"{where('columns.image')}: {len(missing)} image files of {spec.path} do not exist, "
            f"e.g. row {missing[0][0] + 1}: {missing[0][1]} (paths are relative to the table's folder)"
        )
    if not spec.group:
        return rows, None
    values = _sorted_unique(r[2] for r in rows)
    index = {v: i for i, v in enumerate(values)}
    metadata = GroupSpec((spec.group,), spec.group, tuple(str(v) for v in values))
    return [(image, label, index[group]) for image, label, group in rows], metadata


def _captioned(rows: list[tuple[str, Any, Any]], spec: DataSpec, where: Where) -> list[FileSample]:
    """One sample per image, with the captions of all its rows in row order (a list cell adds each of its items)."""
    captions: dict[str, list[str]] = {}
    for row, (image, value, _) in enumerate(rows):
        items = value if isinstance(value, list) else [value]
        texts = [" ".join(str(t).split()) for t in items if t is not None and str(t).strip()]
        if not texts:
            raise ClipsiftError(f"{where('columns.caption')}: row {row + 1} of {spec.path} has no caption")
        captions.setdefault(image, []).extend(texts)
    return [FileSample(image, captions=tuple(texts)) for image, texts in captions.items()]


def _sorted_unique(values: Any) -> list[Any]:
    """Distinct values, numbers in numeric order, others as text."""
    distinct = set(values)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    return sorted(distinct) if numeric else sorted(distinct, key=str)


def _labelled(task: Task, rows: list[tuple[str, Any, Any]], where: Where) -> tuple[list[FileSample], list[str]]:
    """Samples with class indices, and the class names: the task's, else the distinct labels (folder names) in
    order."""
    if task.classnames:
        keys, names = list(task.class_keys or task.classnames), list(task.classnames)
    else:
        keys = [str(v) for v in _sorted_unique(r[1] for r in rows)]
        names = keys
    index = {k: i for i, k in enumerate(keys)}
    for image, label, _ in rows:
        if str(label) not in index:
            raise ClipsiftError(
                f"{where('classnames')}: label {str(label)!r} (of {image}) is not in the class list "
                f"({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})"
            )
    return [FileSample(image, label=index[str(label)], group=group) for image, label, group in rows], names


# --------------------------------------------------------------------------- make-task


@dataclasses.dataclass
class MadeTask:
    out: str
    samples: int
    shards: int
    written: int  # tars written by this call (the others were there from a killed run)
    classes: int | None
    entry: dict[str, Any]  # the suite entry for the task (also in OUT/task.yaml)


OPTION = {
    "data": "--from",
    "layout": "--layout",
    "columns.image": "--image-column",
    "columns.label": "--label-column",
    "columns.caption": "--caption-column",
    "columns.group": "--group-column",
    "classnames": "--classnames",
    "templates": "--templates",
    "metric": "--metric",
    "size": "--from",
    "classes": "--classnames",
}


def make_task(
    src: str,
    task_type: str,
    out: str,
    *,
    shard_size: int = 10_000,
    layout: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    group_column: str | None = None,
    classnames: list[str] | dict[str, str] | None = None,
    templates: list[str] | None = None,
    key: str | None = None,
    metric: str | None = None,
) -> MadeTask:
    """Write an image folder or table as a task in the webdataset layout (resumable: finished tars are kept).

    OUT gets test/{i}.tar (the samples' members as `open_task` reads them), classnames.txt and
    zeroshot_classification_templates.txt (classification), dataset_type.txt (retrieval),
    make-task.json (what it was made from) and task.yaml (the task's entry for a suite file, its `data`
    relative to task.yaml). `metric`: the main metric; by default the type's choice for the data
    (`TaskType.default_metric`: classification with classes of unequal sizes is scored by mean per-class recall).
    """
    kind = task_types.REGISTRY.get(task_type)
    if kind is None or kind.wds_only:
        writable = " or ".join(t.name for t in task_types.REGISTRY.values() if not t.wds_only)
        raise ClipsiftError(f"--type {task_type}: make-task writes {writable} tasks")
    if shard_size < 1:
        raise ClipsiftError(f"--shard-size {shard_size}: must be at least 1")
    src, key = os.path.abspath(src), key or os.path.basename(os.path.normpath(out))
    columns = {
        field: column
        for field, column in (
            ("image", image_column),
            ("label", label_column),
            ("caption", caption_column),
            ("group", group_column),
        )
        if column is not None
    }
    entry = {
        "key": key,
        "type": task_type,
        "metric": metric or kind.default_metric(grouped=bool(group_column)),
        "data": src,
        "layout": layout,
        "columns": columns or None,
        "classnames": classnames,
        "templates": templates,
    }
    where = f"make-task --from {src}"
    try:
        task = parse_suite({"suite": "make-task", "tasks": [{k: v for k, v in entry.items() if v is not None}]}).tasks[
            0
        ]
    except ClipsiftError as err:
        field, _, rest = str(err).removeprefix(f"make-task: task {key}: ").partition(": ")
        raise ClipsiftError(f"{where}: {OPTION.get(field, field)}: {rest}") from None
    if (task.data.layout or detect_layout(src)) == "wds" and os.path.exists(src):
        raise ClipsiftError(f"{where}: already in the webdataset layout; evaluate it as it is (`data: {src}`)")
    data = open_spec(task, "", lambda field: f"{where}: {OPTION.get(field, field)}")
    if metric is None and data.classnames:
        sizes = np.bincount([s.label for s in data.files or []], minlength=len(data.classnames))
        task = dataclasses.replace(task, metric=kind.default_metric(bool(group_column), sizes.tolist()))
    return _write(data, task, out, shard_size)


def _write(data: TaskData, task: Task, out: str, shard_size: int) -> MadeTask:
    files = data.files or []
    listing = [dataclasses.astuple(s) for s in files]
    build = {
        "format": BUILD_FORMAT,
        "type": task.type,
        "from": task.data.path,
        "samples": len(files),
        "shard_size": shard_size,
        "classnames": data.classnames,
        "templates": data.templates,
        "groups": list(data.metadata.group_names) if data.metadata else None,
        "listing_sha256": hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest(),
    }
    fs, root = open_fs(out)
    fs.makedirs(root, exist_ok=True)
    build_path = f"{root}/{TASK_BUILD}"
    if fs.exists(build_path):
        previous = json.loads(fs.cat_file(build_path))
        if previous != build:
            changed = [k for k in build if previous.get(k) != build[k]]
            raise ClipsiftError(
                f"{out} holds a task made from other data or settings ({', '.join(changed)} differ); "
                "choose another --out or delete it"
            )
    else:
        write_json_atomic(fs, build_path, build)
    write_task_texts(fs, root, data.classnames, data.templates, task.kind.type_file)
    shards, written = max(1, -(-len(files) // shard_size)), 0
    for shard in range(shards):
        path = f"{root}/{SPLIT}/{shard}.tar"
        if fs.exists(path):  # tars are written atomically: one that exists is complete
            continue
        chunk = range(shard * shard_size, min(len(files), (shard + 1) * shard_size))
        write_tar(fs, path, [(sample_key(i), files[i].members()) for i in chunk])
        written += 1
    finish_task(fs, root, shards)
    entry = _entry(data, task, ".", len(files))  # the data is task.yaml's own folder: the folder can move
    text = yaml.safe_dump([entry], sort_keys=False, allow_unicode=True, width=120).encode("utf-8")
    write_atomic(fs, f"{root}/{TASK_ENTRY}", lambda handle: handle.write(text))
    return MadeTask(out, len(files), shards, written, len(data.classnames) if data.classnames else None, entry)


def _entry(data: TaskData, task: Task, out: str, size: int) -> dict[str, Any]:
    """The suite entry of a made task: its data in the webdataset layout, with the size and groups it holds."""
    entry: dict[str, Any] = {"key": task.key, "type": task.type, "metric": task.metric, "data": out, "size": size}
    if data.classnames:
        entry["classes"] = len(data.classnames)
    if data.metadata:
        spec = data.metadata
        entry["metadata"] = {
            "fields": list(spec.fields),
            "group_by": spec.group_by,
            "group_names": list(spec.group_names),
        }
    return entry


def read_entry(out: str) -> dict[str, Any]:
    """The suite entry make-task wrote into OUT/task.yaml, its `data` resolved against OUT (an absolute path)."""
    entry = yaml.safe_load(Path(out, TASK_ENTRY).read_text(encoding="utf-8"))[0]
    return {**entry, "data": os.path.normpath(os.path.join(os.path.abspath(out), entry["data"]))}


def read_lines_file(path: str, pairs: bool = False) -> list[str] | dict[str, str]:
    """The non-empty lines of a text file; with `pairs`, lines 'key<TAB>value' make a mapping (all or none)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise ClipsiftError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not lines:
        raise ClipsiftError(f"{path} is empty")
    if pairs and any("\t" in line for line in lines):
        bad = next((n for n, line in enumerate(lines, 1) if "\t" not in line), None)
        if bad:
            raise ClipsiftError(f"{path}: line {bad} has no tab; give every line as 'label<TAB>name' or none")
        return dict(tuple(part.strip() for part in line.split("\t", 1)) for line in lines)
    return lines
