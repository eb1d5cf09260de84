"""Evaluation metrics of embeddings: retrieval (P@1, MAP@R, R-precision, recall@K), verification (ROC-AUC, EER,
best-threshold accuracy) and triplet accuracy.

Plain functions of tensors, no ranks. Retrieval is exact and never builds an N×N matrix: every item queries all
the others through a faiss flat inner-product index (exact k-NN by cosine similarity), a block of queries at a
time, with k the largest class size minus one (what MAP@R and R-precision need). Memory is O(N·D) for the
index plus one block of neighbours, whatever N. The queries can be split into equal shares
(`retrieval_scores(..., share=, shares=)`), one per worker; the per-query scores of all shares, in share
order, summarise (`summarize_retrieval`) to exactly what one process computes. The definitions are those of
pytorch-metric-learning's `AccuracyCalculator` (the reference implementation of MAP@R; a test compares them).
A metric that is undefined for the given data (no query with a same-label item, a single verification class)
is left out of the returned dict rather than reported as NaN, which JSON lines and W&B handle badly.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

RETRIEVAL_COLUMNS = ("precision_at_1", "r_precision", "map_at_r", "recall_at_k")
"""The per-query retrieval scores, in the column order of `retrieval_scores` (a last column flags scored queries)."""
NEIGHBOUR_BLOCK = 1 << 20
"""Neighbour entries (queries × k) held at once: bounds the memory of a block of queries for any N and k."""
QUERY_BLOCK = (32, 4096)
"""Fewest and most queries per block: faiss answers under 20 queries without BLAS, over 4096 in sub-blocks."""


def set_search_threads(threads: int) -> None:
    """Threads of faiss's k-NN search in this process (OpenMP, apart from torch's): a worker's CPU share, so
    that workers on one node do not each take every core."""
    faiss.omp_set_num_threads(threads)


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, recall_k: int = 10) -> dict[str, float]:
    """Each item queries all other items; returns precision_at_1, map_at_r, r_precision, recall_at_k and
    num_queries (items whose label has at least one other item; only they are scored)."""
    return summarize_retrieval(retrieval_scores(embeddings, labels, recall_k))


def retrieval_scores(embeddings: torch.Tensor, labels: torch.Tensor, recall_k: int = 10, *, share: int = 0,
                     shares: int = 1) -> torch.Tensor:
    """Per-query scores [Q, 5] (float64, columns RETRIEVAL_COLUMNS then 1.0 for a scored query, 0.0 for a query
    whose label has no other item) of share `share` of `shares` of the queries, each querying all N items.

    The shares are contiguous runs of whole query blocks whose bounds do not depend on `shares`, so a query's
    scores are computed the same way in every share (bit for bit): the shares concatenated in order equal
    `shares=1`."""
    if len(embeddings) != len(labels):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    if not 0 <= share < shares:
        raise ValueError(f"share {share} is outside {shares} shares")
    dense, counts = _dense_labels(labels)
    k = neighbours_needed(counts, recall_k)
    blocks = query_blocks(len(dense), k)
    mine = blocks[len(blocks) * share // shares : len(blocks) * (share + 1) // shares]
    if not mine:
        return torch.zeros((0, len(RETRIEVAL_COLUMNS) + 1), dtype=torch.float64)
    index = CosineIndex(embeddings) if k > 0 else None
    return torch.cat([_block_scores(index, dense, counts, block, k, recall_k) for block in mine])


def summarize_retrieval(scores: torch.Tensor) -> dict[str, float]:
    """Mean per-query scores over the scored queries, plus num_queries; only num_queries when none is scored."""
    table = scores.detach().to("cpu", torch.float64).numpy()
    scored = table[table[:, -1] > 0]
    if len(scored) == 0:
        return {"num_queries": 0.0}
    means = {name: float(np.mean(scored[:, column])) for column, name in enumerate(RETRIEVAL_COLUMNS)}
    return {**means, "num_queries": float(len(scored))}


def neighbours_needed(counts: torch.Tensor, recall_k: int) -> int:
    """k of the k-NN search (the query itself excluded): the largest R (class size − 1) and recall_k, at most
    the N − 1 other items."""
    total = int(counts.sum())
    return max(0, min(max(int(counts.max()) - 1 if total else 0, recall_k), total - 1))


def query_blocks(num_items: int, k: int) -> list[range]:
    """Consecutive blocks of query positions, sized so that a block's k + 1 neighbours fit NEIGHBOUR_BLOCK."""
    fewest, most = QUERY_BLOCK
    size = max(fewest, min(most, NEIGHBOUR_BLOCK // (k + 1)))
    return [range(start, min(start + size, num_items)) for start in range(0, num_items, size)]


class CosineIndex:
    """Exact k-NN by cosine similarity among a set of items: a faiss flat inner-product index of the
    L2-normalised float32 vectors (the towers output unit vectors already, up to low-precision rounding)."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.vectors = F.normalize(embeddings.detach().to("cpu", torch.float32), dim=1).contiguous().numpy()
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)

    def others(self, block: range, k: int) -> torch.Tensor:
        """The k nearest other items [len(block), k] of the items in `block`, nearest first.

        k + 1 are searched and the query itself removed (or the farthest, where an exact duplicate pushed the
        query out of its own k + 1)."""
        _, found = self.index.search(self.vectors[block.start : block.stop], k + 1)
        neighbours = torch.as_tensor(found)
        keep = neighbours != torch.arange(block.start, block.stop)[:, None]
        keep[keep.all(dim=1), -1] = False
        return neighbours[keep].view(len(block), k)


def _block_scores(index: CosineIndex | None, dense: torch.Tensor, counts: torch.Tensor, block: range, k: int,
                  recall_k: int) -> torch.Tensor:
    query = dense[block.start : block.stop]
    relevant = counts[query] - 1  # R: the other items of the query's class
    scores = torch.zeros((len(block), len(RETRIEVAL_COLUMNS) + 1), dtype=torch.float64)
    if index is None or not bool(relevant.gt(0).any()):
        return scores
    same = dense[index.others(block, k)] == query[:, None]  # [B, k], nearest first
    within_r = torch.arange(k) < relevant[:, None]
    hits = same & within_r
    precision_at_rank = hits.cumsum(dim=1).double() / torch.arange(1, k + 1)
    r = relevant.clamp(min=1).double()
    scores[:, 0] = same[:, 0].double()
    scores[:, 1] = hits.sum(dim=1).double() / r
    scores[:, 2] = (precision_at_rank * hits).sum(dim=1) / r
    scores[:, 3] = same[:, :recall_k].any(dim=1).double()
    scores[:, 4] = 1.0
    return scores * relevant.gt(0)[:, None]


def _dense_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Class ids remapped to 0..C-1 (ids may be large or negative), and the item count of each class.
    _, dense, counts = torch.unique(labels.detach().to("cpu").flatten(), return_inverse=True, return_counts=True)
    return dense, counts


def verification_metrics(emb_a: torch.Tensor, emb_b: torch.Tensor, similar: torch.Tensor) -> dict[str, float]:
    """Pair verification from the cosine similarity of each (a, b) pair; `similar` is 1/True for similar pairs.

    Returns roc_auc, eer, best_threshold_accuracy and best_threshold (a pair is predicted similar when its
    score is ≥ the threshold), plus num_pairs. With a single class present, ROC-AUC and EER are undefined and
    left out; the best-threshold accuracy is still returned.
    """
    return verification_from_scores(cosine_scores(emb_a, emb_b), similar.detach().to("cpu").flatten().numpy())


def verification_from_scores(scores: np.ndarray, similar: np.ndarray) -> dict[str, float]:
    """`verification_metrics` from each pair's cosine similarity and its similar flag (O(N log N))."""
    truth = similar.astype(bool)
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
    return triplet_from_scores(cosine_scores(anchor, positive), cosine_scores(anchor, negative))


def triplet_from_scores(positive_scores: np.ndarray, negative_scores: np.ndarray) -> dict[str, float]:
    """`triplet_metrics` from each triplet's cos(anchor, positive) and cos(anchor, negative)."""
    if len(positive_scores) == 0:
        return {"num_triplets": 0.0}
    accuracy = float(np.mean(positive_scores > negative_scores))
    return {"triplet_accuracy": accuracy, "num_triplets": float(len(positive_scores))}
