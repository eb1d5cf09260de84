"""Query→document retrieval on pair splits: a hand-computed example, sentence-transformers' evaluator on the same
embeddings, and shares of the queries that add up to one process (the multi-process proof is in
test_evaluation_sharded.py)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluation import (
    pair_retrieval_metrics,
    pair_retrieval_names,
    pair_retrieval_scores,
    retrieval_task,
    summarize_pair_retrieval,
)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_hand_computed_example() -> None:
    """Pairs (a, b, similar) over 2-D unit vectors at the given angles; duplicates by content id.

    Documents: d1 at 0°, d2 at 50°, d3 at 100°, d4 at 200°. Queries: q1 at 10° paired with d1 and d2 (d1 twice),
    q2 at 95° paired with d1, q3 at 180° only in a dissimilar pair (d4), so it is not a query.
      q1: ranking d1, d2, d3, d4 → relevant d1, d2: R@1 1/2, R@5 1, MRR 1, nDCG 1.
      q2: ranking d3 (5°), d2 (45°), d1 (95°), d4 → first relevant at rank 3: R@1 0, R@5 1, MRR 1/3,
          nDCG (1/log2 4) / 1 = 0.5.
    """
    a_angles, b_angles = [10, 10, 95, 180, 10], [0, 50, 0, 200, 0]
    a_content, b_content = [1, 1, 2, 3, 1], [11, 12, 11, 14, 11]
    similar = [1, 1, 1, 0, 1]
    # d3 (100°) appears only as the partner of a dissimilar pair whose a is q3's copy
    a_angles.append(180)
    b_angles.append(100)
    a_content.append(3)
    b_content.append(13)
    similar.append(0)
    a = torch.tensor([unit(x) for x in a_angles])
    b = torch.tensor([unit(x) for x in b_angles])
    got = pair_retrieval_metrics(a, torch.tensor(a_content), b, torch.tensor(b_content), torch.tensor(similar),
                                 recall_k=3)
    assert got == pytest.approx({
        "retrieval_a2b/recall_at_1": (0.5 + 0.0) / 2, "retrieval_a2b/recall_at_5": 1.0,
        "retrieval_a2b/recall_at_3": 1.0, "retrieval_a2b/mrr_at_3": (1 + 1 / 3) / 2,
        "retrieval_a2b/ndcg_at_3": (1 + 0.5) / 2, "retrieval_a2b/num_queries": 2.0})
    # b→a: d1 queries {q1, q2}, d2 queries {q1}; corpus q1 (10°), q2 (95°), q3 (180°).
    #   d1 (0°): q1, q2, q3 → R@1 1/2, MRR 1, nDCG 1. d2 (50°): q1 (40°) vs q2 (45°) → q1 first: all 1.
    back = pair_retrieval_metrics(b, torch.tensor(b_content), a, torch.tensor(a_content), torch.tensor(similar),
                                  recall_k=3, prefix="retrieval_b2a")
    assert back["retrieval_b2a/recall_at_1"] == pytest.approx(0.75)
    assert back["retrieval_b2a/mrr_at_3"] == pytest.approx(1.0) and back["retrieval_b2a/num_queries"] == 2.0


def random_split(seed: int, pairs: int = 90) -> tuple[torch.Tensor, ...]:
    """Random pairs over 40 query and 60 document contents (so items repeat), 80 % similar."""
    gen = torch.Generator().manual_seed(seed)
    query_content = torch.randint(0, 40, (pairs,), generator=gen)
    document_content = torch.randint(0, 60, (pairs,), generator=gen)
    query_table, document_table = torch.randn(40, 8, generator=gen), torch.randn(60, 8, generator=gen)
    similar = torch.rand(pairs, generator=gen) < 0.8
    return query_table[query_content], query_content, document_table[document_content], document_content, similar


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_sentence_transformers_information_retrieval_evaluator(seed: int) -> None:
    evaluation = pytest.importorskip("sentence_transformers.evaluation")
    queries, query_content, documents, document_content, similar = random_split(seed)
    got = pair_retrieval_metrics(queries, query_content, documents, document_content, similar, recall_k=10)

    relevant: dict[str, set[str]] = {}
    for q, d, s in zip(query_content.tolist(), document_content.tolist(), similar.tolist(), strict=True):
        if s:
            relevant.setdefault(f"q{q}", set()).add(f"d{d}")
    evaluator = evaluation.InformationRetrievalEvaluator(
        {f"q{q}": "" for q in query_content.tolist()}, {f"d{d}": "" for d in document_content.tolist()}, relevant,
        mrr_at_k=[10], ndcg_at_k=[10], precision_recall_at_k=[1, 5, 10], accuracy_at_k=[1], map_at_k=[10])
    table_q = dict(zip(query_content.tolist(), torch.nn.functional.normalize(queries, dim=1), strict=False))
    table_d = dict(zip(document_content.tolist(), torch.nn.functional.normalize(documents, dim=1), strict=False))
    results = [[{"corpus_id": f"d{d}", "score": float(table_q[int(qid[1:])] @ vector)}
                for d, vector in table_d.items()] for qid in evaluator.queries_ids]
    reference = evaluator.compute_metrics(results)
    assert got["retrieval_a2b/num_queries"] == len(evaluator.queries_ids)
    expected = {"recall_at_1": reference["recall@k"][1], "recall_at_5": reference["recall@k"][5],
                "recall_at_10": reference["recall@k"][10], "mrr_at_10": reference["mrr@k"][10],
                "ndcg_at_10": reference["ndcg@k"][10]}
    assert {k.split("/")[1]: v for k, v in got.items() if k != "retrieval_a2b/num_queries"} == \
        pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 < expected["recall_at_1"] < 1.0 and 0.0 < expected["ndcg_at_10"] < 1.0  # not a degenerate case


def test_shares_of_the_queries_add_up_to_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.evaluation.QUERY_BLOCK", (4, 4))  # several blocks for 3 shares
    queries, query_content, documents, document_content, similar = random_split(2)
    task = retrieval_task(query_content, document_content, similar)
    whole = pair_retrieval_scores(queries, documents, task, 10)
    shares = [pair_retrieval_scores(queries, documents, task, 10, share=s, shares=3) for s in range(3)]
    assert all(len(part) for part in shares)
    assert torch.equal(torch.cat(shares), whole)
    assert summarize_pair_retrieval(whole, 10, "x") == summarize_pair_retrieval(torch.cat(shares), 10, "x")


def test_metric_names_are_unique_and_documented() -> None:
    assert pair_retrieval_names(10) == ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")
    assert pair_retrieval_names(5) == ("recall_at_1", "recall_at_5", "mrr_at_5", "ndcg_at_5")
