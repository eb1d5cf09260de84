"""Evaluation metrics of embeddings: retrieval (P@1, MAP@R, R-precision, recall@K), verification (ROC-AUC, EER,
best-threshold accuracy) and triplet accuracy.

Plain functions of tensors, no ranks: the caller gathers the held-out embeddings first. Retrieval uses
pytorch-metric-learning's `AccuracyCalculator` (the reference implementation of MAP@R) with a faiss k-NN.
A metric that is undefined for the given data (no query with a same-label item, a single verification class)
is left out of the returned dict rather than reported as NaN, which JSON lines and W&B handle badly.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels
from pytorch_metric_learning.utils.inference import FaissKNN
from sklearn.metrics import roc_auc_score, roc_curve

# PML metric names → the names Twinscale logs.
RETRIEVAL_METRICS = {
    "precision_at_1": "precision_at_1",
    "mean_average_precision_at_r": "map_at_r",
    "r_precision": "r_precision",
    "recall_at_k": "recall_at_k",
}


class RetrievalAccuracyCalculator(AccuracyCalculator):
    """PML's AccuracyCalculator plus `recall_at_k`, added through PML's documented `calculate_*` extension."""

    def __init__(self, recall_k: int, **kwargs: Any) -> None:
        self.recall_k = recall_k
        super().__init__(**kwargs)

    def requires_knn(self) -> list[str]:
        """Metrics computed from the k-NN labels (PML's, plus recall_at_k)."""
        return [*super().requires_knn(), "recall_at_k"]

    def determine_k(self, bin_counts: torch.Tensor, num_reference_embeddings: int,
                    ref_includes_query: bool) -> int:
        """The integer k chosen by `retrieval_metrics`, without PML's check against the largest class count.

        That check counts the query itself, so it warns falsely when one class holds every item and k is
        clamped to N - 1, which still covers every query's R (its class count minus itself).
        """
        return int(self.k)

    def calculate_recall_at_k(self, knn_labels: torch.Tensor, query_labels: torch.Tensor,
                              not_lone_query_mask: torch.Tensor, **kwargs: Any) -> float:
        """Fraction of queries with at least one same-label item among their `recall_k` nearest others.

        Queries whose label has no other item are skipped, as PML skips them for its own k-NN metrics.
        """
        knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return float("nan")
        hits = (knn_labels[:, : self.recall_k] == query_labels[:, None]).any(dim=1)
        return hits.double().mean().item()


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, recall_k: int = 10) -> dict[str, float]:
    """Each item queries all other items; returns precision_at_1, map_at_r, r_precision, recall_at_k and
    num_queries (items whose label has at least one other item; only they are scored)."""
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    dense, counts = _dense_labels(labels)
    num_queries = int(counts[dense].gt(1).sum())
    if num_queries == 0:
        return {"num_queries": 0.0}
    k = min(max(int(counts.max()), recall_k), len(labels) - 1)
    calculator = RetrievalAccuracyCalculator(
        recall_k=recall_k,
        include=tuple(RETRIEVAL_METRICS),
        k=k,
        device=torch.device("cpu"),
        # The towers output unit vectors, so the inner product *is* the cosine similarity the model is trained
        # on; an exact flat inner-product index ranks neighbours by it directly. PML's default (flat L2) gives
        # the same order only while every norm is exactly 1, which low-precision (bf16) outputs only approach.
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    query = embeddings.detach().to("cpu", torch.float32)
    results = calculator.get_accuracy(query, dense, ref_includes_query=True)
    metrics = {RETRIEVAL_METRICS[name]: float(value) for name, value in results.items()}
    return {**metrics, "num_queries": float(num_queries)}


def _dense_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # PML casts labels to float32, where integers ≥ 2**24 collide (2**30 and 2**30 + 1 are the same float):
    # remap to 0..C-1 first. Also returns the item count of each class.
    _, dense, counts = torch.unique(labels.detach().to("cpu").flatten(), return_inverse=True, return_counts=True)
    return dense, counts


def verification_metrics(emb_a: torch.Tensor, emb_b: torch.Tensor, similar: torch.Tensor) -> dict[str, float]:
    """Pair verification from the cosine similarity of each (a, b) pair; `similar` is 1/True for similar pairs.

    Returns roc_auc, eer, best_threshold_accuracy and best_threshold (a pair is predicted similar when its
    score is ≥ the threshold), plus num_pairs. With a single class present, ROC-AUC and EER are undefined and
    left out; the best-threshold accuracy is still returned.
    """
    scores = cosine_scores(emb_a, emb_b)
    truth = similar.detach().to("cpu").flatten().numpy().astype(bool)
    if len(scores) != len(truth) or len(truth) == 0:
        raise ValueError(f"need one similar flag per pair, got {len(scores)} pairs and {len(truth)} flags")
    accuracy, threshold = best_threshold_accuracy(scores, truth)
    metrics = {"best_threshold_accuracy": accuracy, "best_threshold": threshold, "num_pairs": float(len(truth))}
    if truth.all() or not truth.any():
        return metrics
    return {"roc_auc": float(roc_auc_score(truth, scores)), "eer": equal_error_rate(scores, truth), **metrics}


def cosine_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> np.ndarray:
    """Cosine similarity of each row of `emb_a` with the same row of `emb_b`, as float64."""
    a, b = (F.normalize(emb.detach().to("cpu", torch.float64), dim=-1) for emb in (emb_a, emb_b))
    return (a * b).sum(dim=-1).numpy()


def equal_error_rate(scores: np.ndarray, truth: np.ndarray) -> float:
    """The error rate where the false-positive rate equals the false-negative rate (1 − TPR), interpolated
    linearly along the ROC segment where they cross. Needs both classes."""
    fpr, tpr, _ = roc_curve(truth, scores)
    gap = (1.0 - tpr) - fpr  # falls from 1 at the strictest threshold to -1 at the loosest
    cross = int(np.argmax(gap <= 0.0))
    if cross == 0 or gap[cross] == 0.0:
        return float(fpr[cross])
    fraction = gap[cross - 1] / (gap[cross - 1] - gap[cross])
    return float(fpr[cross - 1] + fraction * (fpr[cross] - fpr[cross - 1]))


def best_threshold_accuracy(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The highest accuracy of the rule `score ≥ t ⇒ similar` over all t, and the t reaching it.

    The threshold returned is the midpoint between the lowest score predicted similar and the next score
    below it (the centre of the interval of equivalent thresholds), or the lowest score when all pairs are
    predicted similar; above every score when none is.
    """
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    true_positives = np.cumsum(hits)
    false_positives = np.cumsum(~hits)
    negatives = int((~truth).sum())
    # Only the last of a run of equal scores is a valid cut: equal scores get the same prediction.
    cuts = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    correct = true_positives[cuts] + negatives - false_positives[cuts]
    best = int(np.argmax(correct))
    if negatives > correct[best]:  # predicting every pair dissimilar is better than any cut
        return negatives / len(truth), float(np.nextafter(ranked[0], np.inf))
    cut = cuts[best]
    threshold = ranked[cut] if cut + 1 == len(ranked) else (ranked[cut] + ranked[cut + 1]) / 2
    if cut + 1 < len(ranked) and threshold <= ranked[cut + 1]:  # neighbouring floats: no midpoint between
        threshold = ranked[cut]
    return float(correct[best] / len(truth)), float(threshold)


def triplet_metrics(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> dict[str, float]:
    """triplet_accuracy: fraction of triplets with cos(anchor, positive) > cos(anchor, negative)."""
    positive_scores = cosine_scores(anchor, positive)
    negative_scores = cosine_scores(anchor, negative)
    if len(positive_scores) == 0:
        return {"num_triplets": 0.0}
    accuracy = float(np.mean(positive_scores > negative_scores))
    return {"triplet_accuracy": accuracy, "num_triplets": float(len(positive_scores))}
