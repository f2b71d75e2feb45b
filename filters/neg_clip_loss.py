"""neg_clip_loss: the negCLIPLoss of Wang et al. 2024, "CLIPLoss and Norm-Based Data Selection Methods for
Multimodal Contrastive Learning" (arXiv 2405.19547), normalised with a log-MEAN-exp.

For sample i with image and text embeddings v_i, t_i of a scored model (as stored: unit length up to float16
rounding) and similarities s_ij = v_i . t_j, over K random batches B holding i:

    negCLIPLoss_i = mean over the K batches of  s_ii - (tau / 2) * ( logmeanexp_{j in B} s_ij / tau
                                                                  + logmeanexp_{j in B} s_ji / tau )

the CLIP score minus the teacher's contrastive normalisation: a caption that matches every image (or an image
every caption) is marked down. tau is the teacher's temperature (OpenAI CLIP: 1 / logit_scale = 0.01).

The paper writes log-sum-exp; logmeanexp = logsumexp - log|B|, so with batches of one size |B| every score here
is the paper's plus the same constant tau * log|B|: the same ranking, the same rows kept for a fraction (a
threshold value differs by that constant). Where batch sizes differ, the paper's normaliser grows by about
tau * log|B| and a row of a small batch would score higher for that alone; batches are drawn within a shard
(a small last shard, an input thinned by an earlier step), so the mean keeps scores of shards of different sizes
comparable before the top fraction is taken over all of them.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsift.filters.base import Context, Filter, ShardData, register, require
from clipsift.filters.scores import ScoreFiles, TopFraction
from clipsift.pipeline.pool import embedding_matrix

BLOCK_ENTRIES = 1 << 22  # similarities held at once while a batch's log-sum-exps are computed (16 MiB of float32)


@register
@dataclass
class NegClipLoss(TopFraction, Filter):
    """Keep rows whose negCLIPLoss under `model_id` is >= `threshold`, or the top `fraction` of the input
    (clip_score's semantics: filters/scores.py).

    Batches are drawn within a shard, from its input rows that have embeddings (a shard of a DataComp pool is a
    random sample of the pool): each of `batches` draws splits them, in a random order seeded by (seed, shard),
    into batches of equal size (within one row) of at most `batch_size` rows, so the effective batch is
    min(batch_size, the shard's input rows). A shard that fits one batch is scored once (every draw would give the
    same batch). The normaliser is a log-mean-exp (module doc), so shards of different sizes (hence batches of
    different sizes) give comparable scores; with one batch size the ranking is the paper's. Rows without
    embeddings get no score (NaN: never kept, ranked last).

    The scores are computed once, in `prepare`, by a task per shard, and written to the step's work folder
    (OUT.work/.../step-N.scores/, reused by a re-run); the threshold pass and `keep` read them. Memory per
    process: one shard's embeddings and scores, and a block of BLOCK_ENTRIES similarities. Time per shard:
    O(batches x rows x batch x D).
    """

    name = "neg_clip_loss"
    summary = "negCLIPLoss (CLIP score minus the batch's contrastive normalisation) in the top fraction"
    model_id: str
    threshold: float | None = None
    fraction: float | None = None
    temperature: float = 0.01
    batch_size: int = 32768
    batches: int = 10
    seed: int = 0

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.temperature > 0, where, f"parameter 'temperature' must be > 0, got {self.temperature}")
        require(self.batch_size > 0, where, f"parameter 'batch_size' must be > 0, got {self.batch_size}")
        require(self.batches > 0, where, f"parameter 'batches' must be > 0, got {self.batches}")

    def models(self) -> list[str]:
        return [self.model_id]

    def prepare(self, context: Context) -> Any:
        files = ScoreFiles(f"{context.workdir}.scores")
        scorer = functools.partial(
            shard_neg_clip_loss, self.model_id, self.temperature, self.batch_size, self.batches, self.seed
        )
        files.compute(context, scorer, f"neg_clip_loss: score ({self.model_id})")
        return files.cutoff(self, context)

    def keep(self, state: Any, data: ShardData, rows: np.ndarray) -> np.ndarray:
        return state.keep(data)


def shard_rng(seed: int, shard: str) -> np.random.Generator:
    """The generator of a shard's draws: the same for the same (seed, shard id) whatever else the pool holds."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(shard.encode()).digest()[:8], "little")])


def draw_batches(rows: int, batch_size: int, draws: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """`draws` random partitions of range(rows) into ceil(rows / batch_size) batches of equal size (within one);
    one partition when a single batch holds every row."""
    count = -(-rows // batch_size)
    if count <= 1:
        return [[np.arange(rows)]] if rows else []
    return [np.array_split(rng.permutation(rows), count) for _ in range(draws)]


def batch_neg_clip_loss(image: np.ndarray, text: np.ndarray, temperature: float) -> np.ndarray:
    """negCLIPLoss of every row of one batch (image, text: float32 [n, D]), the similarity matrix computed a block
    of rows at a time: each row's log-sum-exp over its block, each column's accumulated over the blocks; log n is
    taken off both (log-mean-exp, see the module doc)."""
    n = len(image)
    rows_lse = np.empty(n, np.float64)
    cols_max = np.full(n, -np.inf)
    cols_sum = np.zeros(n)
    step = max(1, BLOCK_ENTRIES // max(n, 1))
    text_t = np.ascontiguousarray(text.T)
    for start in range(0, n, step):
        logits = (image[start : start + step] @ text_t).astype(np.float64) / temperature
        top = logits.max(axis=1)
        rows_lse[start : start + step] = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        new_max = np.maximum(cols_max, logits.max(axis=0))
        cols_sum = cols_sum * np.exp(cols_max - new_max) + np.exp(logits - new_max).sum(axis=0)
        cols_max = new_max
    diagonal = np.einsum("nd,nd->n", image.astype(np.float64), text.astype(np.float64))
    return diagonal - temperature / 2 * (rows_lse + cols_max + np.log(cols_sum) - 2 * np.log(n))


def neg_clip_loss_scores(
    image: np.ndarray, text: np.ndarray, temperature: float, batches: list[list[np.ndarray]]
) -> np.ndarray:
    """The mean negCLIPLoss of each row over the draws (each a partition of the rows into batches)."""
    total = np.zeros(len(image))
    for partition in batches:
        for batch in partition:
            total[batch] += batch_neg_clip_loss(image[batch], text[batch], temperature)
    return total / max(len(batches), 1)


def shard_neg_clip_loss(
    model_id: str, temperature: float, batch_size: int, draws: int, seed: int, data: ShardData, rows: np.ndarray
) -> np.ndarray:
    """negCLIPLoss (float32, NaN where not scored) of the shard's input rows that have both embeddings."""
    table = data.embeddings(model_id, ["image_emb", "text_emb"])
    image, image_ok = embedding_matrix(table, "image_emb")
    text, text_ok = embedding_matrix(table, "text_emb")
    chosen = np.flatnonzero(rows & image_ok & text_ok)
    out = np.full(len(rows), np.nan, np.float32)
    batches = draw_batches(len(chosen), batch_size, draws, shard_rng(seed, data.shard))
    out[chosen] = neg_clip_loss_scores(image[chosen], text[chosen], temperature, batches)
    return out
