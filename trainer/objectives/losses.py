"""Build pytorch-metric-learning losses, miners and distances from the config.

Losses are built with PML's `DoNothingReducer`, so they return per-pair / per-triplet / per-anchor terms; the
objective reduces those over the global batch itself (see objective.py). `reduction_of` says which of PML's
default reductions a loss uses, so the global reduction matches what PML would compute on one process.
"""

from __future__ import annotations

from typing import Literal

import torch
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner

from trainer.config import LossConfig, MiningConfig

Reduction = Literal["mean", "mean_nonzero"]


def build_distance(name: str) -> distances.BaseDistance:
    """PML distance for `loss.distance`; embeddings are already unit-length, so no re-normalisation changes."""
    if name == "cosine":
        return distances.CosineSimilarity()
    if name == "euclidean":
        return distances.LpDistance(p=2)
    return distances.LpDistance(p=1)


def build_loss(cfg: LossConfig) -> BaseMetricLossFunction:
    """The configured PML loss, returning unreduced terms."""
    common = {"distance": build_distance(cfg.distance), "reducer": reducers.DoNothingReducer()}
    if cfg.name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, **common)
    if cfg.name == "triplet":
        return losses.TripletMarginLoss(margin=cfg.margin, **common)
    if cfg.name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=cfg.alpha, beta=cfg.beta, base=cfg.base, **common)
    if cfg.name == "supcon":
        return losses.SupConLoss(temperature=cfg.temperature, **common)
    return losses.NTXentLoss(temperature=cfg.temperature, **common)


def reduction_of(loss: BaseMetricLossFunction) -> Reduction:
    """PML's default reduction for this loss: a plain mean, or the mean over non-zero terms."""
    default = loss.get_default_reducer()
    if isinstance(default, reducers.AvgNonZeroReducer):
        return "mean_nonzero"
    if isinstance(default, reducers.MeanReducer):
        return "mean"
    raise ValueError(f"{type(loss).__name__}: unsupported default reducer {type(default).__name__}")


def build_miner(cfg: MiningConfig, distance_name: str) -> BaseMiner | None:
    """The configured PML miner (None for `mining.name: none`), on the loss's distance."""
    distance = build_distance(distance_name)
    if cfg.name == "batch_hard":
        return miners.BatchHardMiner(distance=distance)
    if cfg.name == "semi_hard":
        return miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard", distance=distance)
    if cfg.name == "multi_similarity":
        return miners.MultiSimilarityMiner(epsilon=cfg.epsilon, distance=distance)
    return None


def wants_triplets(loss: BaseMetricLossFunction) -> bool:
    """Whether the loss consumes (anchor, positive, negative) triplets rather than pairs."""
    return isinstance(loss, losses.TripletMarginLoss)


def empty_index() -> torch.Tensor:
    """An empty index tensor (int64)."""
    return torch.zeros(0, dtype=torch.long)
