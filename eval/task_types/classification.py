"""Zero-shot classification: an image and its class index (`cls`); with groups, worst-group metrics too.

Read from any layout (webdataset, an image folder, a table with a label column and maybe a group
column). Groups come from the `npy` metadata vector (`metadata.group_by`) or a table's group column.
The classifier comes from the task's templates (or per-class prompts), or from `classifiers` files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval import metrics
from clipsift.eval.task_types.base import Record, TaskType, classifier_files, image_member, npy_member, register

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry


IMBALANCE = 1.5  # make-task scores by mean per-class recall when the largest class is this many times the smallest


@register
class Classification(TaskType):
    name = "classification"
    layouts = ("wds", "folder", "table")
    suite_classnames = True
    class_files = True
    fields = ("classifiers",)
    precision_parts = ("classifier", "images")

    def main_metrics(
        self, group_name: str | None = None, objectives: Sequence[str] = (), **options: Any
    ) -> tuple[str, ...]:
        return metrics.CLASSIFICATION_METRICS + ((f"acc_{group_name}", f"acc_top5_{group_name}") if group_name else ())

    def parse_fields(self, where: str, entry: dict[str, Any], base: str) -> dict[str, Any]:
        return {"classifiers": classifier_files(where, entry.get("classifiers"), base)}

    def metric_hint(self, group_name: str | None) -> str:
        if group_name:
            return ""
        return (
            " (worst-group metrics need a group: `columns: {group: ...}` for a table, "
            "`metadata.group_by` for webdataset data)"
        )

    def default_metric(self, grouped: bool, class_sizes: Sequence[int] | None = None) -> str:
        """acc_wg with groups; mean per-class recall when class sizes differ by more than IMBALANCE; else acc1."""
        if grouped:
            return "acc_wg"
        present = [n for n in class_sizes or () if n > 0]
        return "mean_per_class_recall" if present and max(present) > IMBALANCE * min(present) else "acc1"

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        if "cls" not in entry.members:
            raise ClipsiftError(f"{source}: sample {entry.key} has no `cls` member (its class index)")
        label = int(entry.members["cls"].decode().strip())
        meta = npy_member(entry, source) if with_meta else None
        return Record(index, label=label, meta=meta), [image_member(entry, source)]

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        from clipsift.eval.run import check_size

        spec = data.metadata
        grouped = spec is not None and spec.group_by is not None
        logits, records = zero_shot_logits(model, task, data, batch_size, workers, cache_dir, with_meta=grouped)
        check_size(task, data, len(records))
        labels = _labels(task, data, records)
        values: dict[str, Any] = metrics.classification_metrics(logits, labels)
        if grouped:
            groups = np.array([_meta_value(r, spec.column, spec.fields, data) for r in records])
            values.update(
                metrics.group_metrics(
                    logits,
                    labels,
                    groups,
                    name=spec.name,
                    field=spec.group_by,
                    group_names=spec.group_names,
                    exclude=spec.exclude,
                )
            )
        return values, len(records)


def zero_shot_logits(
    model: EvalModel,
    task: Task,
    data: TaskData,
    batch_size: int,
    workers: int,
    cache_dir: str,
    with_meta: bool = False,
) -> tuple[np.ndarray, list[Record]]:
    """Zero-shot logits [N, classes] in file order and the samples' records.

    Formed per batch inside the image tower's autocast, `100 * features @ classifier`, as clip_benchmark's
    `run_classification` forms them (DataComp runs it with amp=False: fp32).
    """
    import torch

    from clipsift.eval.model import task_classifier
    from clipsift.eval.run import embed_images

    weights = torch.from_numpy(task_classifier(model, task, data, cache_dir)).to(model.device)

    def head(features: torch.Tensor) -> np.ndarray:
        return (100.0 * features @ weights).float().cpu().numpy()

    return embed_images(model, task, data, batch_size, workers, with_meta=with_meta, head=head)


def _labels(task: Task, data: TaskData, records: list[Record]) -> np.ndarray:
    labels = np.array([r.label for r in records], dtype=np.int64)
    classes = len(data.classnames or [])
    if task.classes is not None and classes != task.classes:
        raise ClipsiftError(f"{data.root}: classnames.txt has {classes} classes, {task.key} has {task.classes}")
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise ClipsiftError(f"{data.root}: class index {int(bad[0])} is out of range for {classes} classes")
    return labels


def _meta_value(record: Record, column: int, fields: tuple[str, ...], data: TaskData) -> int:
    if record.meta is None or len(record.meta) != len(fields):
        count = 0 if record.meta is None else len(record.meta)
        raise ClipsiftError(
            f"{data.root}: a sample's npy metadata has {count} values, expected {len(fields)} ({', '.join(fields)})"
        )
    return int(record.meta[column])
