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


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length (zero rows stay zero), contiguous for faiss."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass(frozen=True)
class Neighbours:
    """Each query's k nearest documents, nearest first: cosine similarities and document positions [Q, k]."""

    scores: np.ndarray
    ids: np.ndarray


def nearest(documents: np.ndarray, queries: np.ndarray, k: int, *, same_items: bool = False) -> Neighbours:
    """The k nearest `documents` of each of `queries` by cosine similarity (faiss flat inner product).

    `same_items`: the queries are the documents themselves (query i is document i); each query's own entry is
    left out (or, where an exact duplicate pushed it out of the k + 1 found, the farthest one)."""
    import faiss

    documents, queries = unit_rows(documents), unit_rows(queries)
    k = min(k, len(documents) - (1 if same_items else 0))
    index = faiss.IndexFlatIP(documents.shape[1])
    index.add(documents)
    scores, ids = [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        block = queries[start : start + QUERY_BLOCK]
        found_scores, found = index.search(block, k + (1 if same_items else 0))
        if same_items:
            found_scores, found = _drop_self(found_scores, found, start)
        scores.append(found_scores)
        ids.append(found)
    empty = np.zeros((0, max(k, 0)))
    return Neighbours(np.concatenate(scores) if scores else empty.astype(np.float32),
                      np.concatenate(ids) if ids else empty.astype(np.int64))


def _drop_self(scores: np.ndarray, found: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    keep = found != np.arange(start, start + len(found))[:, None]
    keep[keep.all(axis=1), -1] = False
    rows = len(found)
    return scores[keep].reshape(rows, -1), found[keep].reshape(rows, -1)


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
