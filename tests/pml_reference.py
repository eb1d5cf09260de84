"""pytorch-metric-learning on one process, on the whole batch: the reference the chunked objective must equal."""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.terms import build_distance


def pml_loss(cfg: LossConfig) -> losses.BaseMetricLossFunction:
    """The PML loss of the config, with PML's default reducer."""
    distance = build_distance(cfg.distance)
    if cfg.name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=distance)
    if cfg.name == "triplet":
        return losses.TripletMarginLoss(margin=cfg.margin, distance=distance)
    if cfg.name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=cfg.alpha, beta=cfg.beta, base=cfg.base, distance=distance)
    if cfg.name == "supcon":
        return losses.SupConLoss(temperature=cfg.temperature, distance=distance)
    return losses.NTXentLoss(temperature=cfg.temperature, distance=distance)


def pml_miner(cfg: MiningConfig, distance_name: str) -> miners.BaseMiner | None:
    """The PML miner of the config (None for `none`)."""
    distance = build_distance(distance_name)
    if cfg.name == "batch_hard":
        return miners.BatchHardMiner(distance=distance)
    if cfg.name == "semi_hard":
        return miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard", distance=distance)
    if cfg.name == "multi_similarity":
        return miners.MultiSimilarityMiner(epsilon=cfg.epsilon, distance=distance)
    return None


def pml_value(loss_cfg: LossConfig, mining_cfg: MiningConfig, embeddings: torch.Tensor, labels: torch.Tensor,
              explicit: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """PML's loss of the batch: explicit tuples plus mined tuples, each converted to the loss's tuple form."""
    loss_fn = pml_loss(loss_cfg)
    miner = pml_miner(mining_cfg, loss_cfg.distance)
    parts = [] if explicit is None else [explicit]
    if miner is not None:
        parts.append(miner(embeddings, labels))
    tuples = None
    if parts:
        convert = lmu.convert_to_triplets if loss_cfg.name == "triplet" else lmu.convert_to_pairs
        tuples = tuple(torch.cat(c) for c in zip(*[convert(p, labels) for p in parts], strict=False))
    return loss_fn(embeddings, labels, tuples)
