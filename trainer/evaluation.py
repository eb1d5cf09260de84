"""Evaluation metrics of embeddings: retrieval (P@1, MAP@R, R-precision, recall@K), query→document retrieval on
pairs (R@1, R@5, R@K, MRR@K, nDCG@K), verification (ROC-AUC, EER, best-threshold accuracy) and triplet accuracy.

Plain functions of tensors, no ranks. Retrieval is exact and never builds an N×N matrix: every item queries all
the others through a faiss flat inner-product index (exact k-NN by cosine similarity), a block of queries at a
time, with k the largest class size minus one (what MAP@R and R-precision need). Memory is O(N·D) for the
index plus one block of neighbours, whatever N. The queries can be split into equal shares
(`retrieval_scores(..., share=, shares=)`), one per worker; the per-query scores of all shares, in share
order, summarise (`summarize_retrieval`) to exactly what one process computes. The definitions are those of
pytorch-metric-learning's `AccuracyCalculator` (the reference implementation of MAP@R; a test compares them).
Pair retrieval follows sentence-transformers' InformationRetrievalEvaluator (a test compares them): each distinct
query (by content) with at least one relevant document searches every distinct document; recall@k is the
fraction of the query's relevant documents in its top k, MRR@k the reciprocal rank of the first relevant one
within k, nDCG@k binary-relevance DCG over the ideal DCG of its relevant documents; means over queries.
A metric that is undefined for the given data (no query with a same-label item, a single verification class)
is left out of the returned dict rather than reported as NaN, which JSON lines and W&B handle badly.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The k nearest items [Q, k] of each query vector (L2-normalised here), nearest first."""
        return self.search_scored(queries, k)[1]

    def search_scored(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` with the cosine similarity of each neighbour: (scores [Q, k] float32, items [Q, k])."""
        vectors = F.normalize(queries.detach().to("cpu", torch.float32), dim=1).contiguous().numpy()
        scores, found = self.index.search(vectors, k)
        return torch.as_tensor(scores), torch.as_tensor(found)

    def others(self, block: range, k: int) -> torch.Tensor:
        """The k nearest other items [len(block), k] of the items in `block`, nearest first."""
        return self.others_scored(block, k)[1]

    def others_scored(self, block: range, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`others` with the cosine similarity of each neighbour: (scores [B, k] float32, items [B, k]).

        k + 1 are searched and the query itself removed (or the farthest, where an exact duplicate pushed the
        query out of its own k + 1)."""
        scores, found = self.index.search(self.vectors[block.start : block.stop], k + 1)
        neighbours, similarity = torch.as_tensor(found), torch.as_tensor(scores)
        keep = neighbours != torch.arange(block.start, block.stop)[:, None]
        keep[keep.all(dim=1), -1] = False
        return similarity[keep].view(len(block), k), neighbours[keep].view(len(block), k)


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


def pair_retrieval_names(recall_k: int) -> tuple[str, ...]:
    """Column names of `pair_retrieval_scores`: recall at 1, 5 and `recall_k`, MRR and nDCG at `recall_k`."""
    recalls = tuple(dict.fromkeys((1, 5, recall_k)))
    return (*(f"recall_at_{k}" for k in recalls), f"mrr_at_{recall_k}", f"ndcg_at_{recall_k}")


@dataclass
class RetrievalTask:
    """Distinct queries and documents of a pair split, and which documents each query is paired with as similar."""

    query_rows: torch.Tensor
    """Row (among the split's query-side items) of each distinct query with a relevant document, by content id."""
    document_rows: torch.Tensor
    """Row (among the document-side items) of each distinct document."""
    relevant: torch.Tensor
    """Sorted keys query position × len(document_rows) + document position of every relevant pair (unique)."""
    relevant_counts: torch.Tensor
    """Number of relevant documents of each query."""


def retrieval_task(query_content: torch.Tensor, document_content: torch.Tensor,
                   similar: torch.Tensor) -> RetrievalTask:
    """Deduplicate a pair split by content: item i of the query side was paired with item i of the document side,
    a relevant pair when `similar[i]`. Queries without a relevant document are left out (as sentence-transformers
    does); every distinct document stays in the corpus."""
    query_ids, query_of_item, query_first = _distinct(query_content)
    _, document_of_item, document_first = _distinct(document_content)
    pairs = similar.detach().cpu().bool()
    keys = torch.unique(query_of_item[pairs] * len(document_first) + document_of_item[pairs])
    queries, counts = torch.unique(keys // len(document_first), return_counts=True)
    position = torch.full((len(query_ids),), -1, dtype=torch.long)
    position[queries] = torch.arange(len(queries))
    width = len(document_first)
    relevant = torch.sort(position[keys // width] * width + keys % width).values
    return RetrievalTask(query_first[queries], document_first, relevant, counts)


def pair_retrieval_scores(queries: torch.Tensor, documents: torch.Tensor, task: RetrievalTask, recall_k: int = 10,
                          *, share: int = 0, shares: int = 1) -> torch.Tensor:
    """Per-query scores [Q, len(pair_retrieval_names) + 1] (float64; the last column 1.0 marks a scored query) of
    share `share` of `shares` of the task's queries, each searching all its documents by cosine similarity.
    `queries` and `documents` are the embeddings of the split's query-side and document-side items. As in
    `retrieval_scores`, the shares are runs of whole query blocks, so the shares concatenated equal `shares=1`."""
    names = pair_retrieval_names(recall_k)
    num_documents = len(task.document_rows)
    k = min(max(recall_k, 5), num_documents)
    blocks = query_blocks(len(task.query_rows), k)
    mine = blocks[len(blocks) * share // shares : len(blocks) * (share + 1) // shares]
    if not mine or k == 0:
        return torch.zeros((0, len(names) + 1), dtype=torch.float64)
    index = CosineIndex(documents[task.document_rows])
    parts = []
    for block in mine:
        positions = torch.arange(block.start, block.stop)
        found = index.search(queries[task.query_rows[block.start : block.stop]], k)
        hits = torch.isin(positions[:, None] * num_documents + found, task.relevant)  # [B, k], nearest first
        count = task.relevant_counts[block.start : block.stop].double()
        columns = [hits[:, :cutoff].sum(dim=1).double() / count for cutoff in
                   dict.fromkeys((1, 5, recall_k))]
        within = hits[:, :recall_k]
        ranks = torch.arange(1, within.shape[1] + 1, dtype=torch.float64)
        first = torch.where(within.any(dim=1), 1.0 / ranks[within.double().argmax(dim=1)], 0.0)
        discount = 1.0 / torch.log2(ranks + 1.0)
        ideal = torch.cumsum(discount, 0)[count.clamp(max=len(discount)).long() - 1]
        ndcg = (within.double() * discount).sum(dim=1) / ideal
        parts.append(torch.stack([*columns, first, ndcg, torch.ones(len(block), dtype=torch.float64)], dim=1))
    return torch.cat(parts)


def summarize_pair_retrieval(scores: torch.Tensor, recall_k: int, prefix: str) -> dict[str, float]:
    """Mean per-query scores as `<prefix>/<metric>`, plus `<prefix>/num_queries`; only num_queries without one."""
    table = scores.detach().to("cpu", torch.float64).numpy()
    metrics = {f"{prefix}/{name}": float(np.mean(table[:, column]))
               for column, name in enumerate(pair_retrieval_names(recall_k))} if len(table) else {}
    return {**metrics, f"{prefix}/num_queries": float(len(table))}


def pair_retrieval_metrics(queries: torch.Tensor, query_content: torch.Tensor, documents: torch.Tensor,
                           document_content: torch.Tensor, similar: torch.Tensor, recall_k: int = 10,
                           prefix: str = "retrieval_a2b") -> dict[str, float]:
    """Query→document retrieval on one process: `pair_retrieval_scores` of the whole task, summarised."""
    task = retrieval_task(query_content, document_content, similar)
    return summarize_pair_retrieval(pair_retrieval_scores(queries, documents, task, recall_k), recall_k, prefix)


def _distinct(content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct content ids (sorted), each item's position among them, and the first item holding each."""
    ids, inverse = torch.unique(content.detach().cpu(), return_inverse=True)
    rows = torch.arange(len(inverse))
    first = torch.full((len(ids),), len(inverse), dtype=torch.long).scatter_reduce(0, inverse, rows, "amin")
    return ids, inverse, first
