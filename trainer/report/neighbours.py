"""The numbers behind the report's galleries and tables: exact k-NN by cosine similarity through faiss (a block
of queries at a time, never an N×N matrix), which queries are worst, and precision@1 per class.

Plain functions of NumPy arrays; tests/test_report.py compares them with a dense similarity matrix on small data.
Memory: the documents' vectors (N·D float32) plus one block of queries' neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUERY_BLOCK = 4096
"""Queries searched at once: bounds the neighbour arrays held besides the results."""


@dataclass(frozen=True)
class Neighbours:
    """Each query's k nearest documents, nearest first: cosine similarities and document positions [Q, k]."""

    scores: np.ndarray
    ids: np.ndarray


def nearest(documents: np.ndarray, queries: np.ndarray, k: int, *, same_items: bool = False) -> Neighbours:
    """The k nearest `documents` of each of `queries` by cosine similarity (evaluation's `CosineIndex`: a faiss
    flat inner-product index), a block of queries at a time.

    `same_items`: the queries are the documents themselves (query i is document i); each query's own entry is
    left out (or, where an exact duplicate pushed it out of the k + 1 found, the farthest one)."""
    import torch

    from trainer.evaluation import CosineIndex

    k = max(0, min(k, len(documents) - (1 if same_items else 0)))
    if len(queries) == 0 or k == 0:
        return Neighbours(np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64))
    index = CosineIndex(torch.from_numpy(np.ascontiguousarray(documents, dtype=np.float32)))
    scores, ids = [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        block = range(start, min(start + QUERY_BLOCK, len(queries)))
        if same_items:
            found_scores, found = index.others_scored(block, k)
        else:
            found_scores, found = index.search_scored(torch.from_numpy(np.ascontiguousarray(
                queries[block.start : block.stop], dtype=np.float32)), k)
        scores.append(found_scores.numpy())
        ids.append(found.numpy())
    return Neighbours(np.concatenate(scores), np.concatenate(ids))


def worst_queries(top_scores: np.ndarray, top_right: np.ndarray, eligible: np.ndarray, count: int) -> np.ndarray:
    """Positions of up to `count` eligible queries whose nearest document is wrong, the most confidently wrong
    (highest similarity of that wrong document) first."""
    wrong = np.flatnonzero(eligible & ~top_right)
    order = np.argsort(-top_scores[wrong], kind="stable")
    return wrong[order[:count]]


@dataclass(frozen=True)
class ClassPrecision:
    """Precision@1 of one class's queries."""

    label: int
    queries: int
    precision_at_1: float


def per_class_precision(labels: np.ndarray, top_right: np.ndarray, eligible: np.ndarray) -> list[ClassPrecision]:
    """Precision@1 of each class over its eligible queries (those with another item of their class), by class."""
    labels, hits = labels[eligible], top_right[eligible].astype(np.float64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=hits, minlength=len(classes))
    return [ClassPrecision(int(label), int(count), float(total / count))
            for label, count, total in zip(classes, counts, sums, strict=True)]


def has_partner(labels: np.ndarray) -> np.ndarray:
    """Whether each item's label has at least one other item (only those queries can be right)."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] >= 2
