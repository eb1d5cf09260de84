"""Evaluation metrics against hand-computed examples, a brute-force reference and the PML AccuracyCalculator
path they replaced; query shares against one process; the bounded memory of the k-NN search."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator, try_getting_not_lone_labels
from pytorch_metric_learning.utils.inference import FaissKNN

from trainer import evaluation
from trainer.evaluation import (
    retrieval_metrics,
    retrieval_scores,
    summarize_retrieval,
    triplet_metrics,
    verification_metrics,
)


def on_circle(degrees: list[float]) -> torch.Tensor:
    """Unit 2-D vectors at these angles: cosine similarity falls with the angle between them."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def test_retrieval_two_classes_by_hand() -> None:
    # Points at 0, 10, 25, 45, 70, 100 degrees, labels A A B A B B: every class has 3 items, so R = 2.
    # Neighbours of each query, nearest first (angle gap in brackets):
    #   p0 (A):  p1 A (10), p2 B (25), p3 A (45)    P@1 1, R-prec 1/2, AP@R 1/2 (hit at rank 1 only)
    #   p1 (A):  p0 A (10), p2 B (15), p3 A (35)    P@1 1, R-prec 1/2, AP@R 1/2
    #   p2 (B):  p1 A (15), p3 A (20), p0 A (25)    P@1 0, R-prec 0,   AP@R 0; no B in the top 3
    #   p3 (A):  p2 B (20), p4 B (25), p1 A (35)    P@1 0, R-prec 0,   AP@R 0; first A at rank 3
    #   p4 (B):  p3 A (25), p5 B (30), p2 B (45)    P@1 0, R-prec 1/2, AP@R (1/2)/2 = 1/4 (hit at rank 2)
    #   p5 (B):  p4 B (30), p3 A (55), p2 B (75)    P@1 1, R-prec 1/2, AP@R 1/2
    # P@1 = 3/6; R-precision = 2/6; MAP@R = (1/2 + 1/2 + 1/4 + 1/2) / 6 = 1.75/6;
    # recall@2: all but p2 and p3 have a same-label item in their top 2 = 4/6; recall@3 adds p3 = 5/6.
    embeddings, labels = on_circle([0, 10, 25, 45, 70, 100]), torch.tensor([0, 0, 1, 0, 1, 1])
    metrics = retrieval_metrics(embeddings, labels, recall_k=2)
    assert metrics == pytest.approx({"precision_at_1": 3 / 6, "r_precision": 2 / 6, "map_at_r": 1.75 / 6,
                                     "recall_at_k": 4 / 6, "num_queries": 6})
    assert retrieval_metrics(embeddings, labels, recall_k=3)["recall_at_k"] == pytest.approx(5 / 6)
    assert retrieval_metrics(embeddings, labels, recall_k=1)["recall_at_k"] == pytest.approx(3 / 6)  # = P@1


def test_retrieval_uneven_classes_and_a_lone_item_by_hand() -> None:
    # Points at 0, 20, 50, 65, 90, 135 degrees, labels A A B A B C. A has 3 items (R = 2), B has 2 (R = 1);
    # C has no other item, so it is no query (num_queries = 5), but it is still a neighbour of the others.
    #   q0 (A):  q1 A (20), q2 B (50), q3 A (65)    P@1 1, R-prec 1/2, AP@R 1/2
    #   q1 (A):  q0 A (20), q2 B (30), q3 A (45)    P@1 1, R-prec 1/2, AP@R 1/2
    #   q2 (B):  q3 A (15), q1 A (30), q4 B (40)    P@1 0, R-prec 0,   AP@R 0, recall@2 0
    #   q3 (A):  q2 B (15), q4 B (25), q1 A (45)    P@1 0, R-prec 0,   AP@R 0, recall@2 0
    #   q4 (B):  q3 A (25), q2 B (40), q5 C (45)    P@1 0, R-prec 0 (R = 1), AP@R 0, recall@2 1
    # P@1 = 2/5; R-precision = 1/5; MAP@R = 1/5; recall@2 = 3/5 (q0, q1, q4).
    embeddings, labels = on_circle([0, 20, 50, 65, 90, 135]), torch.tensor([0, 0, 1, 0, 1, 2])
    metrics = retrieval_metrics(embeddings, labels, recall_k=2)
    assert metrics == pytest.approx({"precision_at_1": 2 / 5, "r_precision": 1 / 5, "map_at_r": 1 / 5,
                                     "recall_at_k": 3 / 5, "num_queries": 5})


def test_perfect_clustering_scores_one() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    labels = torch.arange(5).repeat_interleave(7)
    embeddings = centres[labels] + 0.001 * torch.randn(35, 16, generator=generator)
    metrics = retrieval_metrics(torch.nn.functional.normalize(embeddings, dim=1), labels, recall_k=3)
    assert metrics == pytest.approx({"precision_at_1": 1.0, "r_precision": 1.0, "map_at_r": 1.0,
                                     "recall_at_k": 1.0, "num_queries": 35})


def brute_force_retrieval(embeddings: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Direct definitions: rank all other items by cosine similarity, score each non-lone query."""
    similarity = embeddings @ embeddings.T
    scores: dict[str, list[float]] = {"precision_at_1": [], "r_precision": [], "map_at_r": [], "recall_at_k": []}
    for query in range(len(labels)):
        others = np.array([i for i in np.argsort(-similarity[query], kind="stable") if i != query])
        relevant = labels[others] == labels[query]
        r = int(relevant.sum())
        if r == 0:
            continue
        precision_at_rank = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
        scores["precision_at_1"].append(float(relevant[0]))
        scores["r_precision"].append(relevant[:r].mean())
        scores["map_at_r"].append(float((precision_at_rank * relevant[:r]).sum() / r))
        scores["recall_at_k"].append(float(relevant[:k].any()))
    return {name: float(np.mean(values)) for name, values in scores.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_brute_force_on_random_data(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(60, 8, generator=generator), dim=1)
    labels = torch.randint(0, 7, (60,), generator=generator)
    metrics = retrieval_metrics(embeddings, labels, recall_k=4)
    expected = brute_force_retrieval(embeddings.double().numpy(), labels.numpy(), k=4)
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)


class PMLRetrieval(AccuracyCalculator):
    """The retrieval path this module replaced: PML's AccuracyCalculator on one k-NN of every item at once (an
    N × k neighbour matrix, k the largest class size), plus recall_at_k."""

    def __init__(self, recall_k: int, **kwargs: Any) -> None:
        self.recall_k = recall_k
        super().__init__(**kwargs)

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), "recall_at_k"]

    def determine_k(self, bin_counts: torch.Tensor, num_reference_embeddings: int, ref_includes_query: bool) -> int:
        return int(self.k)

    def calculate_recall_at_k(self, knn_labels: torch.Tensor, query_labels: torch.Tensor,
                              not_lone_query_mask: torch.Tensor, **kwargs: Any) -> float:
        knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        return (knn_labels[:, : self.recall_k] == query_labels[:, None]).any(dim=1).double().mean().item()


def pml_retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, recall_k: int) -> dict[str, float]:
    """The previous `retrieval_metrics`, verbatim in what it computes."""
    _, dense, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    names = {"precision_at_1": "precision_at_1", "mean_average_precision_at_r": "map_at_r",
             "r_precision": "r_precision", "recall_at_k": "recall_at_k"}
    calculator = PMLRetrieval(recall_k=recall_k, include=tuple(names), k=min(max(int(counts.max()), recall_k),
                              len(labels) - 1), device=torch.device("cpu"),
                              knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
    results = calculator.get_accuracy(embeddings.float(), dense, ref_includes_query=True)
    return {**{names[name]: float(value) for name, value in results.items()},
            "num_queries": float(counts[dense].gt(1).sum())}


def clustered(seed: int, items: int, classes: int, dim: int = 16, noise: float = 0.6) -> tuple[torch.Tensor, ...]:
    """Unit vectors around class centres (continuous noise: no ties), uneven class sizes, some lone items."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (items,), generator=generator) ** 2  # sparse, uneven ids
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    noisy = centres[labels] + noise * torch.randn(items, dim, generator=generator)
    return torch.nn.functional.normalize(noisy, dim=1), labels


@pytest.mark.parametrize(("seed", "items", "classes", "recall_k"), [(0, 300, 20, 5), (1, 500, 4, 10),
                                                                    (2, 200, 150, 10), (3, 64, 1, 3)])
def test_retrieval_equals_the_pml_path_it_replaced(seed: int, items: int, classes: int, recall_k: int) -> None:
    # Many small classes with lone items, a few large ones (k > 100), one class of everything (k = N - 1).
    embeddings, labels = clustered(seed, items, classes)
    expected = pml_retrieval_metrics(embeddings, labels, recall_k)
    assert retrieval_metrics(embeddings, labels, recall_k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("shares", [2, 3, 5, 40])
def test_query_shares_concatenate_to_one_process_bit_for_bit(monkeypatch: pytest.MonkeyPatch, shares: int) -> None:
    monkeypatch.setattr(evaluation, "NEIGHBOUR_BLOCK", 1000)  # blocks of 32 queries: 13 blocks for 400 items
    embeddings, labels = clustered(4, 400, 12)
    whole = retrieval_scores(embeddings, labels, recall_k=5)
    parts = [retrieval_scores(embeddings, labels, recall_k=5, share=i, shares=shares) for i in range(shares)]
    assert sum(len(part) for part in parts) == 400 and any(len(part) == 0 for part in parts) == (shares > 13)
    assert torch.equal(torch.cat(parts), whole)
    metrics = retrieval_metrics(embeddings, labels, 5)
    assert summarize_retrieval(torch.cat(parts)) == summarize_retrieval(whole) == metrics


def test_knn_search_holds_one_block_of_neighbours_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # One class of 600 items needs k = 599 neighbours per query: 600 × 600 at once before. Blocks of queries
    # keep each search's answer (queries × (k + 1)) within NEIGHBOUR_BLOCK entries, or 32 queries.
    monkeypatch.setattr(evaluation, "NEIGHBOUR_BLOCK", 40_000)
    searched: list[tuple[int, int]] = []
    search = faiss.IndexFlatIP.search

    def recording(index: faiss.IndexFlatIP, queries: np.ndarray, k: int, *args: Any, **kwargs: Any) -> Any:
        searched.append((len(queries), k))
        return search(index, queries, k, *args, **kwargs)

    monkeypatch.setattr(faiss.IndexFlatIP, "search", recording)
    embeddings, labels = clustered(5, 600, 1)
    metrics = retrieval_metrics(embeddings, labels, recall_k=10)
    assert metrics["map_at_r"] == 1.0 and metrics["num_queries"] == 600  # every other item is relevant
    assert sum(queries for queries, _ in searched) == 600 and {k for _, k in searched} == {600}
    assert max(queries * k for queries, k in searched) <= 40_000


def test_an_exact_duplicate_is_a_neighbour_the_query_itself_is_not() -> None:
    # Items 0 and 1 are the same vector: each one's nearest other item is the other, whichever order faiss
    # returns the tie in; the query itself never counts as its own neighbour.
    embeddings = on_circle([0, 0, 40, 80, 120])
    labels = torch.tensor([0, 0, 1, 1, 1])
    scores = retrieval_scores(embeddings, labels, recall_k=1)
    assert scores[:2, 0].tolist() == [1.0, 1.0] and scores[:2, 2].tolist() == [1.0, 1.0]


def test_large_integer_labels_equal_dense_labels() -> None:
    # As float32 (what PML casts labels to), 2**30 + 0 … 2**30 + 63 are all the same number: without the
    # dense remap these 4 classes would merge into one and every metric would be 1.
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
    dense = torch.arange(4).repeat(10)
    assert torch.unique((dense + 2**30).float()).numel() == 1
    large = retrieval_metrics(embeddings, dense + 2**30, recall_k=5)
    assert large == retrieval_metrics(embeddings, dense, recall_k=5)
    assert large["precision_at_1"] < 0.9


def test_retrieval_with_no_possible_match_reports_only_the_count() -> None:
    assert retrieval_metrics(on_circle([0, 30, 60]), torch.tensor([1, 2, 3])) == {"num_queries": 0}


def pairs_with_scores(scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (a, b) of 2-D unit vectors whose cosine similarities are exactly `scores`."""
    cosines = torch.tensor(scores, dtype=torch.float64)
    emb_a = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(len(scores), 2)
    emb_b = torch.stack([cosines, (1 - cosines**2).sqrt()], dim=1)
    return emb_a, emb_b


def test_verification_perfectly_separable() -> None:
    # Similar pairs score 0.9, 0.8, 0.7; dissimilar ones 0.2, 0.1: any threshold in (0.2, 0.7] is perfect,
    # and the threshold reported is the middle of that gap.
    emb_a, emb_b = pairs_with_scores([0.9, 0.2, 0.8, 0.1, 0.7])
    metrics = verification_metrics(emb_a, emb_b, torch.tensor([1, 0, 1, 0, 1]))
    assert metrics == pytest.approx({"roc_auc": 1.0, "eer": 0.0, "best_threshold_accuracy": 1.0,
                                     "best_threshold": 0.45, "num_pairs": 5})


def test_verification_known_equal_error_rate() -> None:
    # Similar: 0.9, 0.8, 0.7, 0.3; dissimilar: 0.6, 0.2, 0.1, 0.0.
    # AUC: 3 similar pairs outrank all 4 dissimilar ones, 0.3 outranks 3 of them: (12 + 3) / 16.
    # At threshold 0.6 one of four dissimilar pairs is accepted (FPR 1/4) and one of four similar pairs is
    # rejected (FNR 1/4): the rates are equal there, EER = 0.25.
    # Accuracy: threshold in (0.6, 0.7] gets 3 + 4 = 7 of 8 right (so does 0.3, which comes later); reported
    # threshold is the midpoint 0.65.
    emb_a, emb_b = pairs_with_scores([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.0])
    metrics = verification_metrics(emb_a, emb_b, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))
    assert metrics == pytest.approx({"roc_auc": 15 / 16, "eer": 0.25, "best_threshold_accuracy": 7 / 8,
                                     "best_threshold": 0.65, "num_pairs": 8})


def test_verification_interpolated_equal_error_rate() -> None:
    # Similar: 0.9, 0.5, 0.4; dissimilar: 0.6. ROC points (FPR, TPR): (0, 0) (0, 1/3) (1, 1/3) (1, 2/3) (1, 1).
    # On the segment (0, 1/3) → (1, 1/3) FNR stays 2/3 while FPR grows from 0 to 1: they meet at 2/3.
    # Best accuracy: accept everything (threshold 0.4) gets the 3 similar pairs right = 3/4.
    emb_a, emb_b = pairs_with_scores([0.9, 0.6, 0.5, 0.4])
    metrics = verification_metrics(emb_a, emb_b, torch.tensor([True, False, True, True]))
    assert metrics["eer"] == pytest.approx(2 / 3)
    assert metrics["roc_auc"] == pytest.approx(1 / 3)  # of 3 (similar, dissimilar) pairs, only 0.9 > 0.6
    assert metrics["best_threshold_accuracy"] == pytest.approx(3 / 4)
    assert metrics["best_threshold"] == pytest.approx(0.4)


def test_verification_with_one_class_leaves_auc_and_eer_out() -> None:
    emb_a, emb_b = pairs_with_scores([0.9, 0.1, 0.5])
    metrics = verification_metrics(emb_a, emb_b, torch.tensor([0, 0, 0]))
    assert set(metrics) == {"best_threshold_accuracy", "best_threshold", "num_pairs"}
    assert metrics["best_threshold_accuracy"] == 1.0 and metrics["best_threshold"] > 0.9


def test_triplet_accuracy_by_hand() -> None:
    # Anchors at 0°; positives at 10°, 50°, 30°; negatives at 20°, 40°, 90°. The positive is nearer (higher
    # cosine) in the first (10° < 20°) and third (30° < 90°) triplets, not the second (50° > 40°): 2/3.
    anchor = on_circle([0, 0, 0])
    metrics = triplet_metrics(anchor, on_circle([10, 50, 30]), on_circle([20, 40, 90]))
    assert metrics == pytest.approx({"triplet_accuracy": 2 / 3, "num_triplets": 3})
