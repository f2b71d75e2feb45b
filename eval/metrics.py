"""Every evaluation metric, one function each, on numpy arrays (the one home of their definitions).

Ties are broken the same way everywhere: among equal scores the lower index ranks first (what
numpy's argmax does), so every metric is a deterministic function of its scores. A metric that is
undefined for its input (top-5 with fewer than 5 classes, an empty subset) is None, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall", "F1-macro_all")
MULTILABEL_METRICS = ("mean_average_precision",)
RETRIEVAL_KS = (1, 5, 10)
WINOGAVIL_METRICS = (
    "avg_jaccard_score",
    "jaccard_score_5",
    "jaccard_score_6",
    "jaccard_score_10",
    "jaccard_score_12",
    "jaccard_score_5-6",
    "jaccard_score_10-12",
)


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column target[i] in row i: higher scores first, then lower indices."""
    rows = np.arange(len(scores))
    own = scores[rows, target][:, None]
    columns = np.arange(scores.shape[1])[None, :]
    return ((scores > own) | ((scores == own) & (columns < target[:, None]))).sum(axis=1)


def predictions(logits: np.ndarray) -> np.ndarray:
    """The top-1 class of each row (the lowest index among tied maxima)."""
    return np.asarray(logits).argmax(axis=1)


def topk_correct(logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is the true class among the k best-scoring classes."""
    logits, targets = np.asarray(logits), np.asarray(targets, dtype=np.int64)
    return _rank_of(logits, targets) < k


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float | None:
    """acc@k; None when there are fewer than k classes (clip_benchmark reports NaN for acc5 there)."""
    if np.asarray(logits).shape[1] < k:
        return None
    return float(topk_correct(logits, targets, k).mean())


def mean_per_class_recall(pred: np.ndarray, targets: np.ndarray) -> float:
    """Balanced accuracy: the mean over the classes present in `targets` of their recall."""
    pred, targets = np.asarray(pred), np.asarray(targets)
    classes = np.unique(targets)
    return float(np.mean([(pred[targets == c] == c).mean() for c in classes]))


def macro_f1(pred: np.ndarray, targets: np.ndarray) -> float:
    """F1 averaged over the classes present in `targets` (WILDS' F1-macro: labels=unique(y_true))."""
    pred, targets = np.asarray(pred), np.asarray(targets)
    scores = []
    for c in np.unique(targets):
        tp = np.sum((pred == c) & (targets == c))
        fp = np.sum((pred == c) & (targets != c))
        fn = np.sum((pred != c) & (targets == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def group_accuracies(correct: np.ndarray, groups: np.ndarray) -> dict[int, tuple[float, int]]:
    """{group value: (mean of `correct`, count)} for every group present."""
    correct, groups = np.asarray(correct, dtype=np.float64), np.asarray(groups)
    return {int(g): (float(correct[groups == g].mean()), int(np.sum(groups == g))) for g in np.unique(groups)}


def worst_group(correct: np.ndarray, groups: np.ndarray, exclude: Sequence[int] = ()) -> float:
    """The lowest per-group mean of `correct` over the groups present, leaving out `exclude`."""
    values = [acc for g, (acc, _) in group_accuracies(correct, groups).items() if g not in set(exclude)]
    if not values:
        raise ValueError("no group left to take the worst of")
    return min(values)


def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
    """acc1, acc5, mean_per_class_recall and F1-macro_all of zero-shot logits [N, classes]."""
    pred = predictions(logits)
    return {
        "acc1": topk_accuracy(logits, targets, 1),
        "acc5": topk_accuracy(logits, targets, 5),
        "mean_per_class_recall": mean_per_class_recall(pred, targets),
        "F1-macro_all": macro_f1(pred, targets),
    }


def group_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    *,
    name: str = "wg",
    field: str = "group",
    group_names: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, float | int | None]:
    """Worst-group accuracy and top-5 accuracy (acc_<name>, acc_top5_<name>) and each group's accuracy.

    `exclude` names groups (by `group_names`) that count in the per-group figures but not in the
    worst group, as FMoW's region "Other".
    """
    label = (lambda g: group_names[g]) if group_names else str
    skip = [i for i, n in enumerate(group_names or ()) if n in set(exclude)]
    top1 = topk_correct(logits, targets, 1)
    metrics: dict[str, float | int | None] = {f"acc_{name}": worst_group(top1, groups, skip)}
    has_top5 = np.asarray(logits).shape[1] >= 5
    metrics[f"acc_top5_{name}"] = worst_group(topk_correct(logits, targets, 5), groups, skip) if has_top5 else None
    for g, (acc, count) in group_accuracies(top1, groups).items():
        metrics[f"acc_{field}:{label(g)}"] = acc
        metrics[f"count_{field}:{label(g)}"] = count
    return metrics


# --------------------------------------------------------------------------- retrieval


def _chunks(n: int, size: int = 8192):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _score_rows(text_emb: Any, image_emb: Any, rows: slice) -> np.ndarray:
    """Scores [texts in rows, images] as float32, formed in the embeddings' own type and dtype (torch or numpy),
    as clip_benchmark forms `texts_emb @ images_emb.t()`."""
    block = text_emb[rows] @ image_emb.T
    return block if isinstance(block, np.ndarray) else block.float().numpy()


def retrieval_metrics(
    image_emb: Any, text_emb: Any, text_image: np.ndarray, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float | None]:
    """Recall@k both ways for images with several captions each; `text_image[t]` is caption t's image.

    image_retrieval_recall@k (text -> image): share of captions whose image is among the k
    best-scoring images. text_retrieval_recall@k (image -> text): share of images with any of
    their captions among the k best-scoring captions. mean_recall@1 is the mean of the two @1 (None
    without k = 1). Embeddings are numpy arrays or torch tensors; both directions rank the same scores.
    """
    text_image = np.asarray(text_image, dtype=np.int64)
    n_images, n_texts = len(image_emb), len(text_emb)
    if np.bincount(text_image, minlength=n_images).min(initial=1) == 0:
        raise ValueError("every image needs at least one caption")
    text_rank, own = [], []
    for rows in _chunks(n_texts):
        scores = _score_rows(text_emb, image_emb, rows)
        text_rank.append(_rank_of(scores, text_image[rows]))
        own.append(scores[np.arange(len(scores)), text_image[rows]])
    best, best_text = _best_captions(np.concatenate(own), text_image, n_images)
    image_rank = np.zeros(n_images, np.int64)
    for rows in _chunks(n_texts):  # each image's best caption against every caption, the same scores again
        scores, texts = _score_rows(text_emb, image_emb, rows), np.arange(rows.start, rows.stop)[:, None]
        image_rank += ((scores > best) | ((scores == best) & (texts < best_text))).sum(axis=0)
    text_rank = np.concatenate(text_rank)
    metrics: dict[str, float | None] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float(np.mean(text_rank < k))
        metrics[f"text_retrieval_recall@{k}"] = float(np.mean(image_rank < k))
    metrics["mean_recall@1"] = (
        0.5 * (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) if 1 in ks else None
    )
    return metrics


def _best_captions(own: np.ndarray, text_image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the best score among its captions and that caption's index (the lowest among ties)."""
    order = np.lexsort((np.arange(len(own)), -own, text_image))  # by image, then score descending, then index
    first = order[np.r_[0, np.flatnonzero(np.diff(text_image[order])) + 1]]
    return own[first][None, :], first[None, :]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Multi-label mAP as clip_benchmark's `average_precision_per_class`: per class, rank the samples by score
    (ties: lower index first) and average the precision at each positive; a class without positives counts 0."""
    return float(np.mean(average_precision_per_class(scores, targets)))


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision of each class (column) of `scores` [N, classes] against 0/1 `targets` [N, classes]."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets) != 0
    ranks = np.arange(1, len(scores) + 1)
    result = np.zeros(scores.shape[1])
    for c in range(scores.shape[1]):
        truth = targets[np.argsort(-scores[:, c], kind="stable"), c]
        precision = np.cumsum(truth) / ranks
        result[c] = precision[truth].sum() / max(int(truth.sum()), 1)
    return result


# --------------------------------------------------------------------------- WinoGAViL


def jaccard_topk(scores: np.ndarray, truth: np.ndarray) -> float:
    """Pick the k best-scoring candidates, k = number of true associations; Jaccard with the truth."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    k = int(truth.sum())
    if k == 0:
        raise ValueError("an example needs at least one true association")
    order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then lower index
    chosen = np.zeros(len(scores), bool)
    chosen[order[:k]] = True
    return float((chosen & truth).sum() / (chosen | truth).sum())


def winogavil_metrics(jaccards: Sequence[float], num_candidates: Sequence[int]) -> dict[str, float | None]:
    """Mean Jaccard overall and by number of candidates (DataComp scores jaccard_score_10-12)."""
    scores, sizes = np.asarray(jaccards, np.float64), np.asarray(num_candidates)

    def mean(mask: np.ndarray) -> float | None:
        return float(scores[mask].mean()) if mask.any() else None

    return {
        "avg_jaccard_score": mean(np.ones(len(scores), bool)),
        "jaccard_score_5": mean(sizes == 5),
        "jaccard_score_6": mean(sizes == 6),
        "jaccard_score_10": mean(sizes == 10),
        "jaccard_score_12": mean(sizes == 12),
        "jaccard_score_5-6": mean(sizes <= 6),
        "jaccard_score_10-12": mean(sizes >= 10),
    }
