"""norm_sim: NormSim_p of Wang et al. 2024, "CLIPLoss and Norm-Based Data Selection Methods for Multimodal
Contrastive Learning" (arXiv 2405.19547): how close a pool image is to a target set (a downstream task's
images), by the p-norm of its similarities to every target image.

For a pool row's image embedding v and the target's image embeddings u_1..u_T (same model):

    NormSim_p(v) = ( sum_t |v . u_t|^p )^(1/p)      p = 2:  sqrt(v^T (U^T U) v)      p = inf:  max_t |v . u_t|

A sum over the target, as the paper defines it (its authors' code takes torch.norm of the similarity row, so
|.| and the sum): a mean would scale every score by T^(-1/p), the same ranking and fraction selection.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipsift import ClipsiftError
from clipsift.files import open_fs, parquet_file
from clipsift.filters.base import Context, Filter, RecipeError, ShardData, register, require
from clipsift.filters.scores import ScoreFiles, TopFraction
from clipsift.filters.suite_data import open_task_data
from clipsift.filters.vectors import check_dim, check_source, load_vectors, vector_files
from clipsift.pipeline.pool import Pool, PoolFormatError

NORMS = ("2", "inf")
BLOCK_ENTRIES = 1 << 22  # similarities held at once for p=inf (16 MiB of float32)


@register
@dataclass
class NormSim(TopFraction, Filter):
    """Keep rows whose NormSim_p to `target` is >= `threshold`, or the top `fraction` of the input (clip_score's
    semantics: filters/scores.py). Rows without an image embedding get no score (never kept, ranked last).

    `target` is a vector source (filters/vectors.py): a pool scored with `model_id`, an embeddings folder, a
    .parquet with `image_emb` or a .npy [rows, D]; its vectors are L2-normalised, the pool's used as stored.
    It is loaded once, in `prepare`, and only when some shard has no score file yet (a re-run that finds them all
    reads no target); its dimension is checked there against the first shard's embeddings. p=2 keeps the D x D
    matrix U^T U (exact: sum_t (v.u_t)^2 = v^T U^T U v), p=inf the target vectors, and max_t |v . u_t| is taken
    over blocks of |V @ U^T| of at most BLOCK_ENTRIES similarities. Scores are computed by a task per shard and
    kept in the step's work folder (step-N.scores/); the threshold pass and `keep` read them. Memory per process:
    the target (D x D for p=2, T x D for p=inf), one shard, and for p=inf a block of BLOCK_ENTRIES float32
    similarities (16 MiB) with its absolute value.

    `suite` (a suite YAML, eval/): refuse a target pool that holds one of the suite's test images (the same
    sha256 of the image bytes, or the same uid where a test sample's json names one); the suite's data is read
    from `suite_data` (default: $CLIPSIFT_EVAL_DATA/<suite>, else ~/.cache/clipsift/eval/<suite>; tasks that
    name their own `data` read it from there).
    """

    name = "norm_sim"
    summary = "NormSim: p-norm of the image's similarities to a target set, in the top fraction"
    model_id: str
    target: str
    p: str = "2"
    threshold: float | None = None
    fraction: float | None = None
    suite: str | None = None
    suite_data: str | None = None

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.p in NORMS, where, f"parameter 'p' must be one of {', '.join(NORMS)}, got {self.p!r}")

    def models(self) -> list[str]:
        return [self.model_id]

    def check(self, pool: Pool, where: str) -> None:
        check_source(self.target, self.model_id, f"{where}: target")
        if self.suite is not None:
            refuse_overlap(self.target, self.suite, self.suite_data, where)

    def sources(self) -> list[str]:
        return [vector_files(self.target, self.model_id)]

    def prepare(self, context: Context) -> Any:
        files = ScoreFiles(f"{context.workdir}.scores")
        if not all(files.exists(shard) for shard in context.shards()):
            target = load_vectors(self.target, self.model_id, f"norm_sim target {self.target}")
            check_dim(target, embedding_dim(context.pool, self.model_id), f"target {self.target}", "norm_sim")
            reference = target_gram(target) if self.p == "2" else target
            scorer = functools.partial(shard_norm_sim, self.model_id, self.p, reference)
            files.compute(context, scorer, f"norm_sim: NormSim-{self.p} ({self.model_id})")
        return files.cutoff(self, context)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return state.keep(data)


def target_gram(target: np.ndarray) -> np.ndarray:
    """U^T U (float64 [D, D]) of the target vectors U [T, D]."""
    target = target.astype(np.float64)
    return target.T @ target


def embedding_dim(pool: Pool, model_id: str) -> int:
    """The dimension of the pool's image embeddings of `model_id`, from the first shard's parquet schema."""
    path = pool.embeddings_path(model_id, pool.shard_ids()[0])
    kind = parquet_file(pool.embeddings_fs, path).schema_arrow.field("image_emb").type
    if not pa.types.is_fixed_size_list(kind):
        raise PoolFormatError(f"{path}: column image_emb is {kind}, expected a fixed_size_list of float16")
    return kind.list_size


def norm_sim_scores(vectors: np.ndarray, p: str, reference: np.ndarray) -> np.ndarray:
    """NormSim_p of each row of `vectors`: `reference` is U^T U for p=2, the target U for p=inf."""
    if len(vectors) == 0:
        return np.zeros(0)
    if p == "2":
        vectors = vectors.astype(np.float64)
        return np.sqrt(np.maximum(np.einsum("nd,nd->n", vectors @ reference, vectors), 0.0))
    return max_abs_similarity(vectors, reference)


def max_abs_similarity(vectors: np.ndarray, target: np.ndarray) -> np.ndarray:
    """max_t |v . u_t| of each row v of `vectors` over the rows u_t of `target` (0 for an empty target), |V @ U^T|
    taken a block of at most BLOCK_ENTRIES entries at a time (rows of V by columns of U^T)."""
    best = np.zeros(len(vectors), np.float32)
    rows = max(1, BLOCK_ENTRIES // max(len(target), 1))
    columns = max(1, BLOCK_ENTRIES // rows)  # the whole target when a block of rows fits beside it
    target_t = np.ascontiguousarray(target.T, np.float32)
    for start in range(0, len(vectors), rows):
        block = np.ascontiguousarray(vectors[start : start + rows], np.float32)
        for first in range(0, len(target), columns):
            highest = np.abs(block @ target_t[:, first : first + columns]).max(axis=1)
            np.maximum(best[start : start + rows], highest, out=best[start : start + rows])
    return best


def shard_norm_sim(model_id: str, p: str, reference: np.ndarray, data: ShardData, rows: np.ndarray) -> np.ndarray:
    """NormSim (float32, NaN where not scored) of the shard's input rows that have an image embedding."""
    vectors, valid = data.image_vectors(model_id)
    chosen = np.flatnonzero(rows & valid)
    out = np.full(len(rows), np.nan, np.float32)
    out[chosen] = norm_sim_scores(vectors[chosen], p, reference)
    return out


# --------------------------------------------------------------------------- the target must not hold test images


def refuse_overlap(target: str, suite: str, data_dir: str | None, where: str) -> None:
    """RecipeError when the target pool holds an image of the suite's tasks (by sha256, or uid where given)."""
    fs, path = open_fs(target)
    if not (fs.isdir(path) and fs.exists(f"{path}/pool.json")):
        raise RecipeError(
            f"{where}: suite {suite}: only a target pool can be checked against a suite (its metadata has each "
            f"image's sha256); {target} is a vector file or folder. Give the pool it was embedded from, or leave "
            "out `suite`"
        )
    hashes, uids = suite_images(suite, data_dir, where)
    pool = Pool(target)
    found, example = 0, None
    for shard in pool.shard_ids():
        table = pool.metadata(shard, ["uid", "sha256"])
        shas = [(s or "").lower() for s in table.column("sha256").to_pylist()]
        for uid, sha in zip(table.column("uid").to_pylist(), shas):
            if sha in hashes or uid in uids:
                found += 1
                example = example or (uid, sha)
    if found:
        raise RecipeError(
            f"{where}: target {target} holds {found} test image(s) of suite {suite} (e.g. uid {example[0]}, "
            f"sha256 {example[1]}): selecting pool data by similarity to them would leak the evaluation into "
            "training. Remove them from the target (e.g. with a dedup or a subset), or pick another target"
        )


def suite_images(suite: str, data_dir: str | None, where: str) -> tuple[set[str], set[str]]:
    """(sha256 hex of every test image, uids named by the test samples' json) of the suite's tasks."""
    from clipsift.eval.registry import load_suite

    try:
        loaded = load_suite(suite)
    except ClipsiftError as err:
        raise RecipeError(f"{where}: suite: {err}") from err
    hashes, uids = set(), set()
    for task in loaded.tasks:
        data = open_task_data(loaded, task, data_dir, where, "the target cannot be checked against its test images")
        for index, source, entry in data.entries():
            _, images = task.kind.parse_sample(entry, index, source, False)
            hashes.update(hashlib.sha256(bytes(image)).hexdigest() for image in images)
            info = json.loads(bytes(entry.members["json"])) if "json" in entry.members else None
            if isinstance(info, dict) and isinstance(info.get("uid"), str):
                uids.add(info["uid"])
    return hashes, uids
