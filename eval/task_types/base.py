"""What every evaluation task type declares, and the registry of types a suite's `type:` names.

A task type (classification, retrieval, winogavil, multiobjective, multilabel) is a `TaskType`
subclass: its name, the metrics it reports that a suite may choose as a task's main metric, the
layouts its data may be in, whether a suite entry gives it class names and templates, whether its
data holds classnames.txt and templates, what its dataset_type.txt says, whether `eval download`
fetches it as the Hub's parquet conversion, its own suite fields (`fields`, `parse_fields`), the
precision parts it runs in (`precision_parts`), how a webdataset sample of it is parsed
(`parse_sample`) and how a task of it is evaluated (`evaluate`). Callers ask the type (`Task.kind`, `task_types.get`),
never compare type names.

Adding a task type means writing one `TaskType` subclass, decorated with `@register`, in one file
of this folder (eval/task_types/<name>.py), and importing that file in one place, the list of
type modules in `clipsift.eval.task_types` (eval/task_types/__init__.py). Nothing else changes:
suite validation, data reading, layouts, downloads and evaluation all go through the class.

This module imports no type module (the package's __init__ collects them) and nothing heavy:
loading a suite stays light. Methods that need the evaluation machinery (torch, the model)
import it when they run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from clipsift import ClipsiftError

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # a sample's image members, in the order they are looked for

REGISTRY: dict[str, TaskType] = {}  # type name -> the type (one instance of its class), in registration order


def register(cls: type[TaskType]) -> type[TaskType]:
    """Class decorator: make `cls` the task type a suite's `type: <cls.name>` means."""
    REGISTRY[cls.name] = cls()
    return cls


# --------------------------------------------------------------------------- what parse_sample gives and reads


@dataclass
class Record:
    """The non-image part of one sample: where it sits and what it is labelled with."""

    index: int  # shard << 32 | position: sorts in file order
    label: int | None = None
    texts: list[str] = field(default_factory=list)
    meta: np.ndarray | None = None
    info: dict[str, Any] | None = None
    num_images: int = 1


def image_member(entry: TarEntry, source: str) -> bytes:
    """The sample's image (its first member with an image extension)."""
    for ext in IMAGE_EXTS:
        if ext in entry.members:
            return entry.members[ext]
    raise ClipsiftError(
        f"{source}: sample {entry.key} has no image member ({', '.join(IMAGE_EXTS)}); members: {sorted(entry.members)}"
    )


def npy_member(entry: TarEntry, source: str) -> np.ndarray:
    """The sample's integer metadata vector (`npy`)."""
    if "npy" not in entry.members:
        raise ClipsiftError(
            f"{source}: sample {entry.key} has no `npy` metadata member, which this task's group metrics need"
        )
    return np.asarray(np.load(io.BytesIO(entry.members["npy"]), allow_pickle=False)).reshape(-1)


def classifier_files(where: str, value: Any, base: str) -> tuple[str, ...] | None:
    """A task's `classifiers`: zero-shot classifier files (.npz of `--save-classifiers`), relative to `base`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ClipsiftError(f"{where}: classifiers: a list of classifier files (.npz, written by --save-classifiers)")
    return tuple(os.path.normpath(os.path.join(base, os.path.expanduser(v))) for v in value)


# --------------------------------------------------------------------------- the type


class TaskType:
    """One kind of evaluation task; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]] = ("wds",)  # layouts its data may be in (registry.LAYOUTS)
    suite_classnames: ClassVar[bool] = False  # a suite entry may give `classnames` and `templates`
    class_files: ClassVar[bool] = False  # its data holds classnames.txt and the templates file
    captioned: ClassVar[bool] = False  # a table's rows give captions (else a label and maybe a group)
    type_file: ClassVar[str | None] = None  # what dataset_type.txt says (None: no file)
    hub_parquet: ClassVar[bool] = False  # `eval download` fetches the Hub's parquet conversion, not the files
    fields: ClassVar[tuple[str, ...]] = ()  # its own suite fields (retrieval's recall_k), read by `parse_fields`
    precision_parts: ClassVar[tuple[str, ...]] = ("images",)  # the parts of `model.Precision` its evaluation uses

    @property
    def wds_only(self) -> bool:
        """Its data is read only in the webdataset layout (no image folder, no table)."""
        return tuple(self.layouts) == ("wds",)

    @property
    def table_columns(self) -> tuple[str, ...]:
        """The table columns a suite entry may name (`columns:`)."""
        return ("image", "caption") if self.captioned else ("image", "label", "group")

    @property
    def value_column(self) -> str:
        """The table column with each image's label or caption(s)."""
        return "caption" if self.captioned else "label"

    def main_metrics(
        self, group_name: str | None = None, objectives: Sequence[str] = (), **options: Any
    ) -> tuple[str, ...]:
        """The metrics it reports that can be a task's main metric.

        `group_name`: the task has groups (acc_<name> metrics); `objectives`: its metadata fields; `options`: the
        task's own fields (`parse_fields`), given only to types that have some.
        """
        raise NotImplementedError

    def parse_fields(self, where: str, entry: dict[str, Any], base: str) -> dict[str, Any]:
        """Its own fields (`fields`) of a suite entry, checked, defaults filled in; paths resolved against `base`."""
        return {}

    def metric_hint(self, group_name: str | None) -> str:
        """Added to the error for a metric that is not one of `main_metrics`."""
        return ""

    def default_metric(self, grouped: bool, class_sizes: Sequence[int] | None = None) -> str:
        """The main metric `eval make-task` writes for a task of this type (with a group column or not;
        `class_sizes`: samples per class, where the type has classes)."""
        raise ClipsiftError(f"make-task writes no {self.name} tasks")

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        """A webdataset sample's record and its image bytes; `with_meta`: read the `npy` metadata too."""
        raise NotImplementedError

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        """Every metric of `task` on `data` and its number of samples."""
        raise NotImplementedError

    def hub_samples(self, rows: Iterator[dict[str, Any]], where: str) -> Iterator[dict[str, bytes]]:
        """The webdataset samples of a Hub parquet conversion's rows (types with `hub_parquet`)."""
        raise ClipsiftError(f"{where}: {self.name} tasks are copied from the Hub, not converted")

    def __repr__(self) -> str:
        return f"<task type {self.name}>"
