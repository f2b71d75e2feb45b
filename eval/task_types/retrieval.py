"""Image-text retrieval: an image and `txt`, its captions one per line (Flickr, MSCOCO); recall@k both ways
(`recall_k`: which k, DataComp's 1, 5 and 10 by default).

Read from the webdataset layout or a table with a caption column; `eval download` converts the
Hub's parquet files (`download.retrieval_samples`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsift import ClipsiftError
from clipsift.eval import metrics
from clipsift.eval.task_types.base import Record, TaskType, image_member, register

if TYPE_CHECKING:
    from clipsift.eval.data import TaskData
    from clipsift.eval.model import EvalModel
    from clipsift.eval.registry import Task
    from clipsift.pipeline.pool import TarEntry


@register
class Retrieval(TaskType):
    name = "retrieval"
    layouts = ("wds", "table")
    captioned = True
    type_file = "retrieval"
    hub_parquet = True
    fields = ("recall_k",)
    precision_parts = ("retrieval",)

    def main_metrics(
        self,
        group_name: str | None = None,
        objectives: Sequence[str] = (),
        recall_k: Sequence[int] = metrics.RETRIEVAL_KS,
        **options: Any,
    ) -> tuple[str, ...]:
        recalls = tuple(f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in recall_k)
        return recalls + (("mean_recall@1",) if 1 in recall_k else ())

    def parse_fields(self, where: str, entry: dict[str, Any], base: str) -> dict[str, Any]:
        """recall_k: the k of recall@k (DataComp's 1, 5, 10 when left out)."""
        value = entry.get("recall_k")
        if value is None:
            return {"recall_k": metrics.RETRIEVAL_KS}
        value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value)
            or len(set(value)) != len(value)
        ):
            raise ClipsiftError(f"{where}: recall_k: a list of distinct whole numbers k >= 1, e.g. [1, 5, 10]")
        return {"recall_k": tuple(sorted(value))}

    def default_metric(self, grouped: bool) -> str:
        return "mean_recall@1"

    def parse_sample(self, entry: TarEntry, index: int, source: str, with_meta: bool) -> tuple[Record, list[bytes]]:
        if "txt" not in entry.members:
            raise ClipsiftError(f"{source}: sample {entry.key} has no `txt` member (its captions, one per line)")
        texts = [t.strip() for t in entry.members["txt"].decode("utf-8").splitlines() if t.strip()]
        if not texts:
            raise ClipsiftError(f"{source}: sample {entry.key} has no caption")
        return Record(index, texts=texts), [image_member(entry, source)]

    def evaluate(
        self, model: EvalModel, task: Task, data: TaskData, batch_size: int, workers: int, cache_dir: str
    ) -> tuple[dict[str, Any], int]:
        """Both towers in the `retrieval` precision part, embeddings normalised inside its autocast and scored in
        their own dtype, as clip_benchmark's `zeroshot_retrieval.evaluate` (DataComp's retr_eval.py) does."""
        from clipsift.eval.run import check_size, embed_images

        emb, records = embed_images(model, task, data, batch_size, workers, part="retrieval", head=_to_cpu)
        check_size(task, data, len(records))
        texts = [t for r in records for t in r.texts]
        text_image = np.repeat(np.arange(len(records)), [len(r.texts) for r in records])
        ks = task.option("recall_k", metrics.RETRIEVAL_KS)
        values = metrics.retrieval_metrics(emb, model.encode_texts(texts, part="retrieval"), text_image, ks)
        values["num_captions"] = len(texts)
        return values, len(records)

    def hub_samples(self, rows: Iterator[dict[str, Any]], where: str) -> Iterator[dict[str, bytes]]:
        from clipsift.eval.download import retrieval_samples

        return retrieval_samples(rows, where)


def _to_cpu(features: Any) -> Any:
    """Keep a batch's normalised embeddings as they are (their dtype), on the CPU."""
    return features.cpu()
