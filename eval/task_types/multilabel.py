"""Multi-label zero-shot classification (clip_benchmark's `multilabel` layout, as its VOC 2007 multi-label task).

A sample is an image and `npy`, a 0/1 vector with one entry per class (1: the class is in the image);
dataset_type.txt says `multilabel`. Each class scores every image (the same zero-shot logits as
classification); the metric is mean average precision. Read only in the webdataset layout.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval import metrics
from clipsift.eval.task_types.base import Record, TaskType, classifier_files, image_member, register

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry


@register
class MultiLabel(TaskType):
    name = "multilabel"
    suite_classnames = True
    class_files = True
    type_file = "multilabel"
    fields = ("classifiers",)
    precision_parts = ("classifier", "images")

    def main_metrics(
        self, group_name: str | None = None, objectives: Sequence[str] = (), **options: Any
    ) -> tuple[str, ...]:
        return metrics.MULTILABEL_METRICS

    def parse_fields(self, where: str, entry: dict[str, Any], base: str) -> dict[str, Any]:
        return {"classifiers": classifier_files(where, entry.get("classifiers"), base)}

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        if "npy" not in entry.members:
            raise ClipsiftError(f"{source}: sample {entry.key} has no `npy` member (its 0/1 vector, one per class)")
        try:
            labels = np.asarray(np.load(io.BytesIO(entry.members["npy"]), allow_pickle=False)).reshape(-1)
        except ValueError as err:
            raise ClipsiftError(f"{source}: sample {entry.key}: `npy` is not a numpy array ({err})") from None
        if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
            raise ClipsiftError(f"{source}: sample {entry.key}: `npy` labels must be 0 or 1, found {labels.tolist()}")
        return Record(index, meta=labels.astype(np.int8)), [image_member(entry, source)]

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        from clipsift.eval.run import check_size
        from clipsift.eval.task_types.classification import zero_shot_logits

        logits, records = zero_shot_logits(model, task, data, batch_size, workers, cache_dir)
        check_size(task, data, len(records))
        classes = len(data.classnames or [])
        wrong = next((r for r in records if len(r.meta) != classes), None)
        if wrong is not None:
            raise ClipsiftError(
                f"{data.root}: a sample's `npy` has {len(wrong.meta)} labels, classnames.txt has {classes} classes"
            )
        targets = np.stack([r.meta for r in records])
        return {
            "mean_average_precision": metrics.mean_average_precision(logits, targets),
            "classes_without_positives": int(np.sum(targets.sum(axis=0) == 0)),
        }, len(records)
