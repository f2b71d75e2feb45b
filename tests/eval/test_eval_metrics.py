"""Every evaluation metric against cases computed by hand (ties, missing classes, few classes, several captions)."""

from __future__ import annotations

import numpy as np
import pytest

from clipsift.eval import metrics
from clipsift.eval.aggregate import suite_summary
from clipsift.eval.registry import parse_suite

# 5 samples, 6 classes. Ties go to the lower class index.
LOGITS = np.array(
    [
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],  # target 0: rank 0
        [0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # target 1: tied with class 0, which ranks first -> rank 1
        [0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # target 0: wins the tie -> rank 0
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # target 5: five lower indices tie ahead -> rank 5
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # target 4: rank 4
    ]
)
TARGETS = np.array([0, 1, 0, 5, 4])


def test_topk_accuracy_breaks_ties_towards_the_lower_index() -> None:
    assert metrics.topk_accuracy(LOGITS, TARGETS, 1) == pytest.approx(2 / 5)
    assert metrics.topk_accuracy(LOGITS, TARGETS, 5) == pytest.approx(4 / 5)
    assert list(metrics.topk_correct(LOGITS, TARGETS, 2)) == [True, True, True, False, False]
    assert list(metrics.predictions(LOGITS)) == [0, 0, 0, 0, 0]


def test_acc5_is_undefined_with_fewer_than_5_classes() -> None:
    logits = np.array([[0.1, 0.9, 0.0, 0.2], [0.8, 0.1, 0.0, 0.2]])
    values = metrics.classification_metrics(logits, np.array([1, 3]))
    assert values["acc5"] is None
    assert values["acc1"] == pytest.approx(0.5)
    assert metrics.topk_accuracy(logits, np.array([1, 3]), 4) == 1.0


def test_mean_per_class_recall_and_macro_f1_skip_classes_without_samples() -> None:
    targets = np.array([0, 0, 0, 1, 2, 2])
    pred = np.array([0, 3, 0, 1, 0, 2])  # class 3 is predicted but never true
    # recalls: class 0 2/3, class 1 1/1, class 2 1/2 (class 3 has no samples and is left out)
    assert metrics.mean_per_class_recall(pred, targets) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # F1 = 2tp / (2tp + fp + fn): class 0 4/6, class 1 2/2, class 2 2/3
    assert metrics.macro_f1(pred, targets) == pytest.approx((4 / 6 + 1 + 2 / 3) / 3)


def test_classification_metrics_bundle() -> None:
    values = metrics.classification_metrics(LOGITS, TARGETS)
    # predictions are all class 0: recall of class 0 is 1, of classes 1, 4, 5 is 0
    assert values["mean_per_class_recall"] == pytest.approx(1 / 4)
    # class 0: tp 2, fp 3, fn 0 -> 4/7; the others 0
    assert values["F1-macro_all"] == pytest.approx((4 / 7) / 4)
    assert values["acc1"] == pytest.approx(0.4) and values["acc5"] == pytest.approx(0.8)


def test_worst_group_leaves_out_excluded_and_absent_groups() -> None:
    correct = np.array([1, 1, 0, 1, 0, 0, 0])
    groups = np.array([0, 0, 0, 1, 1, 2, 2])  # 0: 2/3, 1: 1/2, 2 ("Other"): 0/2; group 3 has no samples
    assert metrics.worst_group(correct, groups) == 0.0
    assert metrics.worst_group(correct, groups, exclude=[2, 3]) == pytest.approx(0.5)
    assert metrics.group_accuracies(correct, groups)[0] == (pytest.approx(2 / 3), 3)


def test_group_metrics_top1_and_top5_by_named_groups() -> None:
    names = ["Asia", "Europe", "Other"]
    groups = np.array([0, 0, 1, 1, 2])
    values = metrics.group_metrics(
        LOGITS, TARGETS, groups, name="worst_region", field="region", group_names=names, exclude=["Other"]
    )
    # top-1 correct: [1, 0, 1, 0, 0] -> Asia 1/2, Europe 1/2, Other 0 (excluded)
    assert values["acc_worst_region"] == pytest.approx(0.5)
    # top-5 correct: [1, 1, 1, 0, 1] -> Asia 1, Europe 1/2
    assert values["acc_top5_worst_region"] == pytest.approx(0.5)
    assert values["acc_region:Other"] == 0.0 and values["count_region:Asia"] == 2
    unnamed = metrics.group_metrics(LOGITS, TARGETS, groups)
    assert unnamed["acc_wg"] == 0.0 and "acc_group:2" in unnamed


def _retrieval_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 images (identity embeddings), 6 captions whose embeddings are their rows of scores."""
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # caption 0 of image 0: rank 0
            [0.2, 0.8, 0.0],  # caption 1 of image 0: rank 1
            [0.8, 0.8, 0.1],  # caption 2 of image 1: tied with image 0, which ranks first -> rank 1
            [0.0, 0.0, 0.7],  # caption 3 of image 2: rank 0
            [0.3, 0.3, 0.3],  # caption 4 of image 2: rank 2
            [0.6, 0.0, 0.4],  # caption 5 of image 2: rank 1
        ],
        dtype=np.float32,
    )
    return np.eye(3, dtype=np.float32), scores, np.array([0, 0, 1, 2, 2, 2])


def test_retrieval_recall_with_several_captions_per_image() -> None:
    images, texts, text_image = _retrieval_case()
    values = metrics.retrieval_metrics(images, texts, text_image, ks=(1, 2))
    assert values["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert values["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    # image -> text: image 0's best caption (0.9) is first; image 1's only caption ties caption 1 (0.8),
    # which has the lower index -> rank 1; image 2's best caption (0.7) is first
    assert values["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert values["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert values["mean_recall@1"] == pytest.approx(0.5)


def test_retrieval_needs_a_caption_for_every_image() -> None:
    images, texts, _ = _retrieval_case()
    with pytest.raises(ValueError, match="at least one caption"):
        metrics.retrieval_metrics(images, texts, np.array([0, 0, 0, 2, 2, 2]))


def test_retrieval_ranks_torch_embeddings_in_their_own_dtype_like_numpy() -> None:
    """Scores are formed in the embeddings' dtype (clip_benchmark's `texts_emb @ images_emb.t()`), one chunk of
    captions at a time; with float32 tensors the figures equal the numpy ones, every k in `ks` is reported."""
    import torch

    rng = np.random.default_rng(2)
    images, texts = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(15, 5)).astype(np.float32)
    owner = np.repeat(np.arange(7), [1, 2, 3, 1, 2, 3, 3])
    numpy_values = metrics.retrieval_metrics(images, texts, owner, ks=(1, 3))
    torch_values = metrics.retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), owner, ks=(1, 3))
    assert torch_values == numpy_values and set(numpy_values) == {
        "image_retrieval_recall@1",
        "image_retrieval_recall@3",
        "text_retrieval_recall@1",
        "text_retrieval_recall@3",
        "mean_recall@1",
    }
    scores = texts @ images.T  # brute force
    best = [max(scores[owner == i, i]) for i in range(7)]
    assert numpy_values["text_retrieval_recall@3"] == pytest.approx(
        np.mean([np.sum(scores[:, i] > best[i]) < 3 for i in range(7)])
    )
    assert metrics.retrieval_metrics(images, texts, owner, ks=(5,))["mean_recall@1"] is None


def test_mean_average_precision_is_clip_benchmarks_average_precision_per_class() -> None:
    """clip_benchmark's multi-label metric: precision at each positive, averaged per class; a class without
    positives counts 0 in the mean. Ties rank the lower index first."""
    import torch
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class

    rng = np.random.default_rng(4)
    scores = rng.normal(size=(40, 5)).astype(np.float32)
    targets = (rng.random((40, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0
    theirs = average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    assert metrics.average_precision_per_class(scores, targets) == pytest.approx(theirs, abs=1e-6)
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(theirs.mean(), abs=1e-6)
    tied = np.array([[0.5], [0.5], [0.1]])
    assert metrics.average_precision_per_class(tied, np.array([[0], [1], [1]])) == pytest.approx([(1 / 2 + 2 / 3) / 2])


def test_winogavil_jaccard_of_the_top_k_candidates() -> None:
    # k = 2 true associations (0 and 3); the top 2 are candidate 0 and, of the tie 2/3, candidate 2
    assert metrics.jaccard_topk(np.array([0.9, 0.1, 0.5, 0.5, 0.2]), np.array([1, 0, 0, 1, 0])) == pytest.approx(1 / 3)
    assert metrics.jaccard_topk(np.array([0.1, 0.9, 0.8]), np.array([0, 1, 1])) == 1.0
    values = metrics.winogavil_metrics([1 / 3, 1.0, 0.5, 0.0], [5, 6, 10, 12])
    assert values["jaccard_score_10-12"] == pytest.approx(0.25)
    assert values["jaccard_score_5-6"] == pytest.approx(2 / 3)
    assert values["jaccard_score_10"] == 0.5 and values["avg_jaccard_score"] == pytest.approx(
        (1 / 3 + 1.0 + 0.5 + 0.0) / 4
    )
    assert metrics.winogavil_metrics([1.0], [5])["jaccard_score_10-12"] is None


SUITE = parse_suite(
    {
        "suite": "mini",
        "download": "get DATA_DIR",
        "groups": {"a": "A", "b": "B"},
        "tasks": [
            {
                "key": "t1",
                "type": "classification",
                "metric": "acc1",
                "groups": ["a"],
                "source": "x",
                "size": 1,
                "classes": 2,
                "chance": 0.5,
            },
            {
                "key": "t2",
                "type": "classification",
                "metric": "acc1",
                "groups": ["a", "b"],
                "source": "x",
                "size": 1,
                "classes": 2,
                "chance": 0.5,
            },
            {
                "key": "t3",
                "type": "retrieval",
                "metric": "mean_recall@1",
                "groups": [],
                "source": "x",
                "size": 1,
                "classes": None,
                "chance": 0.1,
            },
            {
                "key": "u",
                "type": "classification",
                "metric": "acc1",
                "groups": ["a"],
                "source": "x",
                "size": 1,
                "classes": 2,
                "chance": 0.5,
                "scored": False,
            },
        ],
    }
)


def test_summary_averages_are_means_of_main_metrics_and_partial_runs_say_what_is_missing() -> None:
    results = {"t1": {"value": 0.2}, "t3": {"value": 0.6}, "u": {"value": 0.9}}
    partial = suite_summary(SUITE, results, {"t2": "t2: no data"})
    assert partial["average"] == pytest.approx(0.4)  # the unscored task is not averaged
    assert not partial["complete"] and partial["missing"] == ["t2"] and partial["failed"] == {"t2": "t2: no data"}
    assert partial["groups"]["a"] == {
        "label": "A",
        "value": pytest.approx(0.2),
        "tasks": ["t1"],
        "missing": ["t2"],
        "complete": False,
    }
    assert partial["groups"]["b"]["value"] is None
    assert partial["tasks"]["u"]["scored"] is False
    full = suite_summary(SUITE, {**results, "t2": {"value": 0.7}})
    assert full["complete"] and full["missing"] == [] and full["num_evaluated"] == 3
    assert full["average"] == pytest.approx((0.2 + 0.7 + 0.6) / 3)
    assert full["groups"]["a"]["value"] == pytest.approx(0.45) and full["groups"]["b"]["complete"]
