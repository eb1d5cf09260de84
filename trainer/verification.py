"""Verification pairs of a held-out split: each pair's cosine similarity and whether it is a same pair, and the
threshold chosen on them — what `twinscale verify` decides with and what the run report draws (ROC, histograms).

Pairs come from the split's own kind:
- a pair split's (a, b) pairs with their similar flags; when all of them are similar (image–caption sets), also
  as many different pairs: one pair's a with another pair's b, of other content on both sides;
- a triplet split's (anchor, positive) as same and (anchor, negative) as different pairs;
- a labeled split's items sampled into at most `max_pairs` same-class and as many different-class pairs.
Sampling is seeded (the same split gives the same pairs) and never builds the N×N matrix of all pairs.
Plain functions of an `EmbeddedShare` (one process's whole split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.engine.evaluate import EmbeddedShare
from trainer.evaluation import best_threshold_accuracy, cosine_scores

MAX_PAIRS = 20_000
"""Same and different pairs sampled (each) from a labeled split."""


@dataclass(frozen=True)
class VerificationPairs:
    """Cosine similarity and same flag of each held-out pair, and the threshold of best accuracy on them."""

    scores: np.ndarray
    same: np.ndarray
    threshold: float
    accuracy: float

    def decide(self, score: float) -> bool:
        """Whether a pair with this cosine similarity is the same (score ≥ threshold)."""
        return bool(score >= self.threshold)


def heldout_pairs(share: EmbeddedShare, max_pairs: int = MAX_PAIRS, seed: int = 0) -> VerificationPairs | None:
    """The verification pairs of an embedded split (None when it has none: a labeled split with fewer than two
    classes, or no class with two items)."""
    if share.kind == "pairs":
        scores, same = _pair_scores(share, max_pairs, seed)
    elif share.kind == "triplets":
        anchor = share.embeddings["anchor"]
        positive = cosine_scores(anchor, share.embeddings["positive"])
        negative = cosine_scores(anchor, share.embeddings["negative"])
        scores = np.concatenate([positive, negative])
        same = np.concatenate([np.ones(len(positive), bool), np.zeros(len(negative), bool)])
    else:
        if "input" not in share.labels:
            return None
        pairs = sample_label_pairs(share.labels["input"].numpy(), max_pairs, seed)
        if pairs is None:
            return None
        first, second, same = pairs
        embeddings = share.embeddings["input"]
        scores = cosine_scores(embeddings[torch.from_numpy(first)], embeddings[torch.from_numpy(second)])
    if len(scores) == 0 or same.all() or not same.any():
        return None
    accuracy, threshold = best_threshold_accuracy(scores, same)
    return VerificationPairs(scores, same, threshold, accuracy)


def _pair_scores(share: EmbeddedShare, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A pair split's own pairs; when none is dissimilar (image–caption sets: every pair is a match), as many
    different pairs again of one item's a with another item's b, both of other content (a query and a document
    that no pair of the split links), drawn with the seed."""
    assert share.similar is not None
    scores, same = cosine_scores(share.embeddings["a"], share.embeddings["b"]), share.similar.numpy() > 0.5
    if not same.all() or len(same) < 2 or not share.content:
        return scores, same
    content_a, content_b = share.content["a"].numpy(), share.content["b"].numpy()
    rng = np.random.default_rng(seed)
    count = min(len(same), max_pairs)
    first = rng.integers(0, len(same), size=4 * count)
    second = rng.integers(0, len(same), size=4 * count)
    keep = (content_a[first] != content_a[second]) & (content_b[first] != content_b[second])
    first, second = first[keep][:count], second[keep][:count]
    different = cosine_scores(share.embeddings["a"][torch.from_numpy(first)],
                              share.embeddings["b"][torch.from_numpy(second)])
    return np.concatenate([scores, different]), np.concatenate([same, np.zeros(len(first), bool)])


def sample_label_pairs(labels: np.ndarray, max_pairs: int, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Up to `max_pairs` same-label pairs (i ≠ j) and as many different-label pairs of items with `labels`, drawn
    uniformly with a seeded generator in O(max_pairs + N log N) memory; None without both kinds of pair."""
    labels = np.asarray(labels).ravel()
    if len(labels) < 2:
        return None
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    if len(classes) < 2:
        return None
    paired = counts >= 2
    if not paired.any():
        return None
    # Same pairs: a class drawn in proportion to its number of pairs, then two distinct members of it.
    weights = (counts * (counts - 1)).astype(np.float64) * paired
    drawn = rng.choice(len(classes), size=max_pairs, p=weights / weights.sum())
    first_pos = rng.integers(0, counts[drawn])
    second_pos = (first_pos + rng.integers(1, np.maximum(counts[drawn], 2))) % counts[drawn]
    same_first, same_second = order[starts[drawn] + first_pos], order[starts[drawn] + second_pos]
    # Different pairs: two items drawn uniformly, kept when their labels differ (most are; redrawn otherwise).
    diff_first, diff_second = _different_pairs(labels, max_pairs, rng)
    first = np.concatenate([same_first, diff_first])
    second = np.concatenate([same_second, diff_second])
    same = np.concatenate([np.ones(len(same_first), bool), np.zeros(len(diff_first), bool)])
    return first, second, same


def _different_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    firsts: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    found = 0
    for _ in range(64):  # each round keeps ≥ 1/N of its draws in expectation with two classes; far more in practice
        first = rng.integers(0, len(labels), size=2 * count)
        second = rng.integers(0, len(labels), size=2 * count)
        keep = labels[first] != labels[second]
        firsts.append(first[keep])
        seconds.append(second[keep])
        found += int(keep.sum())
        if found >= count:
            break
    return np.concatenate(firsts)[:count], np.concatenate(seconds)[:count]
