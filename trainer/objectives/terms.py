"""The loss terms of a block of anchor rows, written so a block's terms never need another block.

These are pytorch-metric-learning's losses (ContrastiveLoss, TripletMarginLoss, MultiSimilarityLoss, SupConLoss,
NTXentLoss) rewritten on a [C, R] block of the distance matrix, because PML's own versions need the whole
(global batch)² matrix at once. Each block yields pieces of (sum of terms, count for the reducer) per loss
component; the objective adds pieces over blocks and workers and divides by the global counts, which is what
PML's default reducers do (AvgNonZero: count the non-zero terms; Mean: count every term). The tests compare
every loss × miner with PML on the whole batch.

A triplet loss over every (positive, negative) combination yields one piece per positive slot, so memory stays
at a few C × R matrices even when a row has thousands of triplets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from pytorch_metric_learning import distances
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from trainer.config import LossConfig
from trainer.objectives.selection import (
    Block,
    Combos,
    Listed,
    Pairs,
    Part,
    as_pairs,
    as_triplets,
    combo_triplet_weights,
)


@dataclass
class Piece:
    """Part of a block's loss: per component, the sum of its terms (differentiable) and its reducer count."""

    terms: dict[str, tuple[torch.Tensor, torch.Tensor]]
    tuples: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tuples this piece used, by kind (positive_pairs, negative_pairs, triplets): for guards and logging."""


def build_distance(name: str) -> distances.BaseDistance:
    """PML distance for `loss.distance` (it L_p-normalises embeddings first, as PML's losses do)."""
    if name == "cosine":
        return distances.CosineSimilarity()
    if name == "euclidean":
        return distances.LpDistance(p=2)
    return distances.LpDistance(p=1)


class BlockLoss:
    """The configured loss over blocks: `pieces` for one block, `active` for PML's whole-batch guards."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        self.distance = build_distance(cfg.distance)
        self.triplets = cfg.name == "triplet"
        self.components = ("pos_loss", "neg_loss") if cfg.name == "contrastive" else ("loss",)
        """The loss's separately reduced parts (PML's sub-losses), in a fixed order for the collectives."""
        self.tuple_kinds = ("triplets",) if self.triplets else ("positive_pairs", "negative_pairs")
        self.in_batch_negatives = cfg.name in ("supcon", "infonce")
        """Softmax losses: explicit tuples without a miner take every other item of the batch as a negative."""

    def pieces(self, mat: torch.Tensor, block: Block, parts: list[Part]) -> Iterator[Piece]:
        """The loss pieces of one block; `mat` is the block's matrix with autograd, `parts` its selections."""
        if self.triplets:
            for part in parts:
                yield from self._triplet_pieces(mat, as_triplets(part), block.inverted)
            return
        pairs = [as_pairs(part, block) for part in parts]
        total = Pairs(sum((p.pos for p in pairs), torch.zeros_like(block.mat)),
                      sum((p.neg for p in pairs), torch.zeros_like(block.mat)))
        piece = getattr(self, f"_{self.cfg.name}")(mat, total)
        piece.tuples = {"positive_pairs": total.pos.sum(), "negative_pairs": total.neg.sum()}
        yield piece

    def active(self, tuples: dict[str, torch.Tensor]) -> bool:
        """PML returns zero for a whole batch without enough pairs; the same guard, on global tuple counts."""
        if self.triplets:
            return True
        positive, negative = float(tuples["positive_pairs"]), float(tuples["negative_pairs"])
        if positive <= 1 and negative <= 1:  # GenericPairLoss: all(len(x) <= 1 for x in indices_tuple)
            return False
        return self.cfg.name not in ("supcon", "infonce") or (positive > 0 and negative > 0)

    def _contrastive(self, mat: torch.Tensor, pairs: Pairs) -> Piece:
        pos_terms = torch.relu(self.distance.margin(mat, self.cfg.pos_margin))
        neg_terms = torch.relu(self.distance.margin(self.cfg.neg_margin, mat))
        return Piece({"pos_loss": _nonzero_mean_parts(pos_terms, pairs.pos),
                      "neg_loss": _nonzero_mean_parts(neg_terms, pairs.neg)})

    def _multi_similarity(self, mat: torch.Tensor, pairs: Pairs) -> Piece:
        cfg = self.cfg
        pos_exp, neg_exp = self.distance.margin(mat, cfg.base), self.distance.margin(cfg.base, mat)
        pos_loss = lmu.logsumexp(cfg.alpha * pos_exp, keep_mask=pairs.pos > 0, add_one=True) / cfg.alpha
        neg_loss = lmu.logsumexp(cfg.beta * neg_exp, keep_mask=pairs.neg > 0, add_one=True) / cfg.beta
        losses = pos_loss + neg_loss  # one term per anchor; PML's MeanReducer counts every anchor
        return Piece({"loss": (losses.sum(), torch.tensor(float(len(losses)), device=mat.device))})

    def _supcon(self, mat: torch.Tensor, pairs: Pairs) -> Piece:
        pos_mask = (pairs.pos > 0).to(mat.dtype)
        logits = (mat if self.distance.is_inverted else -mat) / self.cfg.temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        denominator = lmu.logsumexp(logits, keep_mask=(pairs.pos > 0) | (pairs.neg > 0), add_one=False, dim=1)
        log_prob = logits - denominator
        losses = -(pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + c_f.small_val(mat.dtype))
        return Piece({"loss": (losses.sum(), (losses > 0).sum().to(mat.dtype))})

    def _infonce(self, mat: torch.Tensor, pairs: Pairs) -> Piece:
        # NTXentLoss per positive pair (a, p): -log(e^{s_ap} / (e^{s_ap} + Σ_n e^{s_an})) over a's negatives,
        # with PML's per-pair shift max(s_ap, max_n s_an) and its small_val inside the log.
        logits = (mat if self.distance.is_inverted else -mat) / self.cfg.temperature
        has_negative = pairs.neg > 0
        row_max = logits.detach().masked_fill(~has_negative, -torch.inf).max(dim=1, keepdim=True).values
        row_max_finite = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        negatives = (pairs.neg * torch.exp(logits - row_max_finite)).sum(dim=1, keepdim=True)
        shift = torch.maximum(logits.detach(), row_max)
        numerator = torch.exp(logits - shift)
        denominator = torch.exp(row_max_finite - shift) * negatives + numerator
        losses = -torch.log(numerator / denominator + c_f.small_val(mat.dtype))
        return Piece({"loss": ((losses * pairs.pos).sum(), pairs.pos.sum())})

    def _triplet_pieces(self, mat: torch.Tensor, part: Combos | Listed, inverted: bool) -> Iterator[Piece]:
        margin = self.cfg.margin
        if isinstance(part, Listed):
            ap, an = mat[part.anchor, part.positive], mat[part.anchor, part.negative]
            losses = torch.relu(self.distance.margin(ap, an) + margin)
            ones = torch.ones_like(losses)
            yield Piece({"loss": _nonzero_mean_parts(losses, ones)}, {"triplets": ones.sum()})
            return
        for column, weights in combo_triplet_weights(part, mat.detach(), inverted):
            ap = mat.gather(1, column[:, None])
            losses = torch.relu(self.distance.margin(ap, mat) + margin)
            yield Piece({"loss": _nonzero_mean_parts(losses, weights)}, {"triplets": weights.sum()})


def _nonzero_mean_parts(terms: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ weight·term, Σ weight over non-zero terms): PML's AvgNonZeroReducer, split so blocks can be added."""
    return (terms * weights).sum(), (weights * (terms > 0)).sum()
