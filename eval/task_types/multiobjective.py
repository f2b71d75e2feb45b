"""Several classifications of one image (FairFace, UTKFace: age, gender, race), each with its worst group.

A sample is an image and `npy`, its metadata vector (`metadata.fields`), which holds the class of
each objective; classnames.txt and the templates file are "objective:text" lines. Read only in the
webdataset layout; the built-in suites report these tasks but do not score them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval import metrics
from clipsift.eval.task_types.base import Record, TaskType, image_member, npy_member, register

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry


def split_objectives(lines: list[str]) -> dict[str, list[str]]:
    """'objective:text' lines -> {objective: [text, ...]} in order."""
    split: dict[str, list[str]] = {}
    for line in lines:
        objective, sep, text = line.partition(":")
        if not sep:
            raise ClipsiftError(f"multiobjective line {line!r} is not 'objective:text'")
        split.setdefault(objective.strip(), []).append(text.strip())
    return split


@register
class MultiObjective(TaskType):
    name = "multiobjective"
    class_files = True
    precision_parts = ("classifier", "images")

    def main_metrics(
        self, group_name: str | None = None, objectives: Sequence[str] = (), **options: Any
    ) -> tuple[str, ...]:
        return tuple(name for o in objectives for name in (f"acc_{o}", f"acc_{o}_wg"))

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        return Record(index, meta=npy_member(entry, source)), [image_member(entry, source)]

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        """Accuracy per objective and its worst group (by the metadata's `group_by`, race).

        The objectives' classifiers side by side give one logits matrix per batch, formed in the image tower's
        context as DataComp's fairness_eval.py forms them (`run_multilabel_classification`, amp=False).
        """
        import torch

        from clipsift.eval.model import zero_shot_classifier
        from clipsift.eval.run import check_size, embed_images

        spec = data.metadata
        classes, templates = split_objectives(data.classnames), split_objectives(data.templates)
        chosen = [o for o in classes if spec is not None and o in spec.fields and o in templates]
        if not chosen:
            raise ClipsiftError(
                f"{data.root}: no objective of metadata.fields ({', '.join(spec.fields) if spec else 'none'}) has "
                "class names and templates"
            )
        blocks = [zero_shot_classifier(model, classes[o], templates[o], cache_dir) for o in chosen]
        weights = torch.from_numpy(np.concatenate(blocks, axis=1)).to(model.device)

        def head(features: torch.Tensor) -> np.ndarray:
            return (100.0 * features @ weights).float().cpu().numpy()

        logits, records = embed_images(model, task, data, batch_size, workers, head=head)
        check_size(task, data, len(records))
        meta = np.stack([r.meta for r in records])
        groups = meta[:, spec.column] if spec and spec.group_by else None
        values: dict[str, Any] = {}
        edges = np.cumsum([0] + [b.shape[1] for b in blocks])
        for objective, first, last in zip(chosen, edges[:-1], edges[1:]):
            correct = metrics.predictions(logits[:, first:last]) == meta[:, spec.fields.index(objective)]
            values[f"acc_{objective}"] = float(correct.mean())
            if groups is not None:
                values[f"acc_{objective}_wg"] = metrics.worst_group(correct, groups)
        return values, len(records)
