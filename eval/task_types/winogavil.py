"""WinoGAViL: a cue and candidate images; pick as many as it has associations, scored by Jaccard.

A sample is `json` {"cue", "candidates", "associations"} and the candidate images `img00.<ext>`,
`img01.<ext>`, ... in the order of "candidates"; read only in the webdataset layout, which
`eval download` writes from the Hub's parquet files (`download.winogavil_samples`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval import metrics
from clipsift.eval.task_types.base import IMAGE_EXTS, Record, TaskType, register

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry


def cue_prompt(cue: str) -> str:
    """WinoGAViL's text for a cue: 'A {cue}' / 'An {cue}' (lower-cased)."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"


@register
class WinoGAViL(TaskType):
    name = "winogavil"
    type_file = "winogavil"
    hub_parquet = True
    precision_parts = ("association",)

    def main_metrics(
        self, group_name: str | None = None, objectives: Sequence[str] = (), **options: Any
    ) -> tuple[str, ...]:
        return metrics.WINOGAVIL_METRICS

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        info = json.loads(entry.members["json"]) if "json" in entry.members else None
        if not info or not {"cue", "candidates", "associations"} <= set(info):
            raise ClipsiftError(
                f"{source}: sample {entry.key} needs a `json` member with cue, candidates and associations"
            )
        images = [entry.members.get(f"img{j:02d}.{ext}") for j in range(len(info["candidates"])) for ext in IMAGE_EXTS]
        images = [b for b in images if b is not None]
        if len(images) != len(info["candidates"]):
            raise ClipsiftError(
                f"{source}: sample {entry.key} has {len(images)} candidate images "
                f"for {len(info['candidates'])} candidates"
            )
        return Record(index, info=info, num_images=len(images)), images

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        """Both towers in the `association` precision part; each cue's similarities to its candidates are formed
        inside that autocast, as DataComp's wino_eval.py forms them."""
        import torch

        from clipsift.eval.run import check_size, embed_images

        emb, records = embed_images(model, task, data, batch_size, workers, part="association", head=_to_cpu)
        check_size(task, data, len(records))
        cues = model.encode_texts([cue_prompt(r.info["cue"]) for r in records], part="association")
        jaccards, sizes, start = [], [], 0
        for record, cue in zip(records, cues):
            rows = emb[start : start + record.num_images].to(model.device)
            start += record.num_images
            with torch.inference_mode(), model.autocast("association"):
                similarity = (cue.to(model.device)[None, :] @ rows.T)[0].float().cpu().numpy()
            truth = np.isin(record.info["candidates"], record.info["associations"])
            jaccards.append(metrics.jaccard_topk(similarity, truth))
            sizes.append(record.num_images)
        values = metrics.winogavil_metrics(jaccards, sizes)
        values["num_10-12"] = int(np.sum(np.asarray(sizes) >= 10))
        values["num_images"] = len(emb)
        return values, len(records)

    def hub_samples(self, rows: Iterator[dict[str, Any]], where: str) -> Iterator[dict[str, bytes]]:
        from clipsift.eval.download import winogavil_samples

        return winogavil_samples(rows, where)


def _to_cpu(features: Any) -> Any:
    return features.cpu()
