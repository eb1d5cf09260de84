"""Which pairs and triplets of a block of anchor rows the loss uses: PML's miners, decided row by row.

Every supported miner decides for each anchor from that anchor's row of distances alone (its hardest positive,
its negatives inside a margin, ...), so mining a chunk of anchors against all references selects exactly what
pytorch-metric-learning selects on the whole global batch, without ever holding more than a chunk × references
matrix. Selections keep multiplicities, because PML counts a pair once per tuple that contains it (a semi-hard
triplet miner feeding a pair loss yields the pair (a, p) once per accepted negative).

Three forms cover every miner and every explicit tuple of a shard:
    Pairs  — weights [C, R] of positive and negative pairs (anchor row, reference column);
    Combos — the triplets (a, p, n) with pos[a, p] > 0 and neg[a, n] > 0, weighted pos × neg, optionally only the
             semi-hard ones (what PML's convert_to_triplets and TripletMarginMiner produce);
    Listed — triplets as index lists (batch-hard mining, explicit triplets).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trainer.config import MiningConfig

IndexTuple = tuple[torch.Tensor, ...]


@dataclass
class Block:
    """A chunk of anchor rows against all references."""

    mat: torch.Tensor
    """[C, R] distances, or similarities when `inverted` (detached)."""
    positive: torch.Tensor
    """[C, R] bool: same class as the anchor, the anchor itself excluded."""
    negative: torch.Tensor
    """[C, R] bool: another class, and other content than the anchor where the batch carries content ids."""
    inverted: bool
    content: torch.Tensor | None = None
    """[R] content ids of the references (a hash of each item's data), None where the labels carry none."""


@dataclass
class Pairs:
    pos: torch.Tensor
    neg: torch.Tensor


@dataclass
class Combos:
    pos: torch.Tensor
    neg: torch.Tensor
    semihard_margin: float | None = None


@dataclass
class Listed:
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


Part = Pairs | Combos | Listed


def mine(block: Block, cfg: MiningConfig) -> Part | None:
    """The configured miner's selection for this block (None for `mining.name: none`)."""
    if cfg.name == "batch_hard":
        return batch_hard(block)
    if cfg.name == "semi_hard":
        return Combos(block.positive.float(), block.negative.float(), cfg.margin)
    if cfg.name == "multi_similarity":
        return multi_similarity(block, cfg.epsilon)
    return None


def batch_hard(block: Block) -> Listed:
    """PML's BatchHardMiner: each anchor's hardest positive and hardest negative, if it has both."""
    far, near = (torch.inf, -torch.inf) if block.inverted else (-torch.inf, torch.inf)
    hardest_positive = block.mat.masked_fill(~block.positive, far)
    hardest_negative = block.mat.masked_fill(~block.negative, near)
    if block.inverted:
        positive, negative = hardest_positive.min(dim=1).indices, hardest_negative.max(dim=1).indices
    else:
        positive, negative = hardest_positive.max(dim=1).indices, hardest_negative.min(dim=1).indices
    keep = torch.where(block.positive.any(dim=1) & block.negative.any(dim=1))[0]
    return Listed(keep, positive[keep], negative[keep])


def multi_similarity(block: Block, epsilon: float) -> Pairs:
    """PML's MultiSimilarityMiner: positives farther than the anchor's nearest negative (± ε), and vice versa."""
    mat = block.mat
    if block.inverted:  # similarities: keep positives below the best negative, negatives above the worst positive
        best_negative = mat.masked_fill(~block.negative, -torch.inf).max(dim=1, keepdim=True).values
        worst_positive = mat.masked_fill(~block.positive, torch.inf).min(dim=1, keepdim=True).values
        pos = block.positive & (mat - epsilon < best_negative)
        neg = block.negative & (mat + epsilon > worst_positive)
    else:
        best_negative = mat.masked_fill(~block.negative, torch.inf).min(dim=1, keepdim=True).values
        worst_positive = mat.masked_fill(~block.positive, -torch.inf).max(dim=1, keepdim=True).values
        pos = block.positive & (mat + epsilon > best_negative)
        neg = block.negative & (mat - epsilon < worst_positive)
    return Pairs(pos.float(), neg.float())


def explicit_part(explicit: IndexTuple, start: int, stop: int, block: Block) -> Part:
    """A shard's own pairs/triplets (anchors local rows, partners reference columns) for rows [start, stop)."""
    if len(explicit) == 3:
        anchor, positive, negative = explicit
        keep = (anchor >= start) & (anchor < stop)
        return Listed(anchor[keep] - start, positive[keep], negative[keep])
    a1, p, a2, n = explicit
    pos, neg = torch.zeros_like(block.mat), torch.zeros_like(block.mat)
    keep_pos, keep_neg = (a1 >= start) & (a1 < stop), (a2 >= start) & (a2 < stop)
    pos.index_put_((a1[keep_pos] - start, p[keep_pos]), torch.ones_like(p[keep_pos], dtype=pos.dtype), accumulate=True)
    neg.index_put_((a2[keep_neg] - start, n[keep_neg]), torch.ones_like(n[keep_neg], dtype=neg.dtype), accumulate=True)
    return Pairs(pos, neg)


def with_in_batch_negatives(part: Part, block: Block) -> Pairs:
    """Explicit tuples plus every reference that is not a positive as a negative of each anchor with a positive.

    What softmax losses on pairs expect (sentence-transformers' MultipleNegativesRankingLoss, CLIP): a reference
    is left out when it shares the anchor's class (`block.negative`), is one of the anchor's explicit positives,
    or holds the same content as the anchor or as one of its explicit positives — the same text in another pair
    is not a negative. The shard's own negatives keep their multiplicity; in-batch ones count once.
    """
    pairs = as_pairs(part, block)
    explicit_positive = pairs.pos > 0
    candidates = block.negative & ~explicit_positive & explicit_positive.any(dim=1, keepdim=True)
    if block.content is not None and bool(explicit_positive.any()):
        _, content = torch.unique(block.content, return_inverse=True)
        held = torch.zeros(len(block.mat), int(content.max()) + 1, dtype=torch.bool, device=block.mat.device)
        rows, columns = explicit_positive.nonzero(as_tuple=True)
        held[rows, content[columns]] = True  # per anchor: the contents of its explicit positives
        candidates &= ~held[:, content]
    return Pairs(pairs.pos, torch.maximum(pairs.neg, candidates.to(pairs.neg.dtype)))


def everything(block: Block, triplets: bool) -> Part:
    """No miner and no explicit tuples: every pair (or triplet) of the block, as PML does by default."""
    pos, neg = block.positive.float(), block.negative.float()
    return Combos(pos, neg) if triplets else Pairs(pos, neg)


def as_triplets(part: Part) -> Combos | Listed:
    """PML's convert_to_triplets: pairs become every (positive pair, negative pair) sharing an anchor."""
    return Combos(part.pos, part.neg) if isinstance(part, Pairs) else part


def as_pairs(part: Part, block: Block) -> Pairs:
    """PML's convert_to_pairs: each triplet (a, p, n) contributes the pairs (a, p) and (a, n)."""
    if isinstance(part, Pairs):
        return part
    pos, neg = torch.zeros_like(block.mat), torch.zeros_like(block.mat)
    if isinstance(part, Listed):
        ones = torch.ones_like(part.anchor, dtype=pos.dtype)
        pos.index_put_((part.anchor, part.positive), ones, accumulate=True)
        neg.index_put_((part.anchor, part.negative), ones, accumulate=True)
        return Pairs(pos, neg)
    for column, weights in combo_triplet_weights(part, block.mat, block.inverted):
        neg += weights
        pos.scatter_add_(1, column[:, None], weights.sum(dim=1, keepdim=True))
    return Pairs(pos, neg)


def combo_triplet_weights(combos: Combos, mat: torch.Tensor, inverted: bool
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per positive slot: each row's positive column [C] and the weights [C, R] of its triplets over negatives.

    Slot j holds every row's j-th positive, so a row with P positives appears in P slots; memory stays at a
    few C × R matrices however many triplets there are.
    """
    present = combos.pos > 0
    slots = int(present.sum(dim=1).max()) if present.numel() else 0
    order = torch.argsort(present.to(torch.int8), dim=1, descending=True, stable=True)[:, :slots]
    for j in range(slots):
        column = order[:, j]
        pos_weight = combos.pos.gather(1, column[:, None])
        weights = pos_weight * combos.neg
        if combos.semihard_margin is not None:
            ap = mat.gather(1, column[:, None])
            margin = ap - mat if inverted else mat - ap  # TripletMarginMiner's triplet margin
            weights = weights * ((margin <= combos.semihard_margin) & (margin > 0))
        yield column, weights
