"""The metric-learning objective over the global batch: local anchors against the references of all workers.

Each worker embeds its local batch (B_local rows), gathers every worker's rows with autograd (B_global
references), mines over the global batch and computes the loss of its own anchors against all references, so
its similarity matrix is B_local × B_global. The loss terms are reduced with global counts: the workers'
shares add up to exactly the loss one process would compute on the whole global batch, and so do their
gradients (the train step multiplies by the world size to undo data-parallel gradient averaging).

Index tuples follow PML: pairs are (anchor, positive, anchor, negative), triplets (anchor, positive,
negative); anchors index the local batch, positives/negatives the global references.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.gather import Collective
from trainer.objectives.losses import build_loss, build_miner, reduction_of, wants_triplets

IndexTuple = tuple[torch.Tensor, ...]


@dataclass
class ObjectiveOutput:
    """What one step's objective produced."""

    local_share: torch.Tensor
    """This worker's part of the global loss (the shares of all workers sum to it); differentiable."""
    loss: torch.Tensor
    """The global loss, equal on every worker (detached)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Counters worth logging: tuples used, anchors that had a positive in the global batch."""


class MetricObjective:
    """Loss + miner from the config, evaluated for local anchors against the global batch."""

    def __init__(self, loss_cfg: LossConfig, mining_cfg: MiningConfig, collective: Collective) -> None:
        self.loss_fn = build_loss(loss_cfg)
        self.miner = build_miner(mining_cfg, loss_cfg.distance)
        self.reduction = reduction_of(self.loss_fn)
        self.collective = collective

    def __call__(
        self, embeddings: torch.Tensor, labels: torch.Tensor, explicit: IndexTuple | None = None
    ) -> ObjectiveOutput:
        """Loss of `embeddings` (local rows) with `labels`; `explicit` tuples index the local batch."""
        embeddings = embeddings.float()
        references = self.collective.gather_with_grad(embeddings)
        reference_labels = self.collective.gather(labels)
        self_index = self.collective.rank * len(embeddings) + torch.arange(len(embeddings), device=labels.device)
        tuples = self._select_tuples(references, labels, reference_labels, self_index, explicit)
        terms = self.loss_fn(embeddings, labels, tuples, references, reference_labels)
        local_share, loss = self._reduce_globally(terms, embeddings)
        # The backward of the gather is a collective: keep it in every worker's graph, even when this
        # worker's anchors produced no loss terms, or the other workers would wait for it forever.
        local_share = local_share + 0.0 * references.sum()
        stats = {
            "tuples": float(len(tuples[0])),
            "anchors_with_positive": positive_fraction(labels, reference_labels, self_index),
        }
        return ObjectiveOutput(local_share, loss, stats)

    def _select_tuples(
        self,
        references: torch.Tensor,
        labels: torch.Tensor,
        reference_labels: torch.Tensor,
        self_index: torch.Tensor,
        explicit: IndexTuple | None,
    ) -> IndexTuple:
        offset = int(self_index[0]) if len(self_index) else 0
        parts: list[IndexTuple] = []
        if explicit is not None:
            parts.append(shift_references(explicit, offset))
        if self.miner is not None:
            # Mining runs over the whole global batch (no autograd), exactly as on one process; only the
            # tuples anchored on this worker's rows are kept.
            mined = self.miner(references.detach(), reference_labels)
            parts.append(keep_local_anchors(mined, offset, len(labels)))
        if explicit is None and self.miner is None:
            parts.append(all_triplets(labels, reference_labels, self_index) if wants_triplets(self.loss_fn)
                         else all_pairs(labels, reference_labels, self_index))
        converted = [self._as_loss_tuple(part, labels, reference_labels) for part in parts]
        return tuple(torch.cat(column) for column in zip(*converted, strict=False))

    def _as_loss_tuple(self, part: IndexTuple, labels: torch.Tensor, reference_labels: torch.Tensor) -> IndexTuple:
        if wants_triplets(self.loss_fn):
            return tuple(lmu.convert_to_triplets(part, labels, reference_labels))
        return tuple(lmu.convert_to_pairs(part, labels, reference_labels))

    def _reduce_globally(self, terms: dict, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = [], []
        for component in terms.values():
            values = component["losses"]
            if not torch.is_tensor(values) or values.numel() == 0:
                values = embeddings.new_zeros(0)
            kept = values > 0 if self.reduction == "mean_nonzero" else torch.ones_like(values, dtype=torch.bool)
            sums.append((values * kept).sum())
            counts.append(kept.sum().to(embeddings.dtype))
        global_counts = self.collective.sum(torch.stack(counts)).clamp(min=1)
        local_share = (torch.stack(sums) / global_counts).sum()
        loss = (self.collective.sum(torch.stack(sums).detach()) / global_counts).sum()
        return local_share, loss


def shift_references(tuples: IndexTuple, offset: int) -> IndexTuple:
    """Local-batch tuples → anchors stay local, partners become positions among the global references."""
    anchors_at = (0,) if len(tuples) == 3 else (0, 2)
    return tuple(t if i in anchors_at else t + offset for i, t in enumerate(tuples))


def keep_local_anchors(tuples: IndexTuple, offset: int, size: int) -> IndexTuple:
    """Global-batch tuples → those anchored in rows [offset, offset+size), anchors renumbered locally."""
    if len(tuples) == 3:
        a, p, n = tuples
        keep = (a >= offset) & (a < offset + size)
        return a[keep] - offset, p[keep], n[keep]
    a1, p, a2, n = tuples
    keep_pos = (a1 >= offset) & (a1 < offset + size)
    keep_neg = (a2 >= offset) & (a2 < offset + size)
    return a1[keep_pos] - offset, p[keep_pos], a2[keep_neg] - offset, n[keep_neg]


def _match_masks(
    labels: torch.Tensor, reference_labels: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    matches = labels[:, None] == reference_labels[None, :]
    differs = ~matches
    matches[torch.arange(len(labels), device=labels.device), self_index] = False
    return matches, differs


def all_pairs(labels: torch.Tensor, reference_labels: torch.Tensor, self_index: torch.Tensor) -> IndexTuple:
    """Every positive and negative pair of local anchors against the references, without self-pairs."""
    matches, differs = _match_masks(labels, reference_labels, self_index)
    a1, p = torch.where(matches)
    a2, n = torch.where(differs)
    return a1, p, a2, n


def all_triplets(labels: torch.Tensor, reference_labels: torch.Tensor, self_index: torch.Tensor) -> IndexTuple:
    """Every (anchor, positive, negative) triplet of local anchors against the references, without self."""
    matches, differs = _match_masks(labels, reference_labels, self_index)
    a, p, n = torch.where(matches[:, :, None] & differs[:, None, :])
    return a, p, n


def positive_fraction(labels: torch.Tensor, reference_labels: torch.Tensor, self_index: torch.Tensor) -> float:
    """Fraction of local anchors with at least one positive (other than themselves) in the global batch."""
    if len(labels) == 0:
        return 0.0
    matches, _ = _match_masks(labels, reference_labels, self_index)
    return float(matches.any(dim=1).float().mean())
