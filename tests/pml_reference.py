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


def in_batch_value(cfg: LossConfig, embeddings: torch.Tensor, labels: torch.Tensor,
                   explicit: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SupCon / InfoNCE of explicit tuples with in-batch negatives, enumerated anchor by anchor on the whole batch.

    An anchor's negatives: its explicit negatives, plus every other item that is not its explicit positive, not
    of its class, and not of the content of the anchor or of one of its explicit positives. `labels` are class
    ids [N] (every item its own content) or [N, 2] class and content ids.
    """
    n = len(embeddings)
    classes, content = (labels[:, 0], labels[:, 1]) if labels.dim() == 2 else (labels, -1 - torch.arange(n))
    classes, content = classes.tolist(), content.tolist()
    distance = build_distance(cfg.distance)
    mat = distance(embeddings)
    logits = (mat if distance.is_inverted else -mat) / cfg.temperature
    positives: dict[int, list[int]] = {a: [] for a in range(n)}
    negatives: dict[int, list[int]] = {a: [] for a in range(n)}
    pairs = explicit if len(explicit) == 4 else (explicit[0], explicit[1], explicit[0], explicit[2])
    for a, p in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        positives[a].append(p)
    for a, q in zip(pairs[2].tolist(), pairs[3].tolist(), strict=True):
        negatives[a].append(q)
    terms, neg_count = [], 0
    for a in range(n):
        if not positives[a]:
            continue
        kept = {content[a]} | {content[p] for p in positives[a]}
        in_batch = [j for j in range(n) if j != a and j not in positives[a] and j not in negatives[a]
                    and classes[j] != classes[a] and content[j] not in kept]
        negs = negatives[a] + in_batch
        neg_count += len(negs)
        if cfg.name == "supcon":
            pos = sorted(set(positives[a]))
            log_denominator = torch.logsumexp(logits[a, sorted(set(pos) | set(negs))], dim=0)
            terms.append(-(logits[a, pos] - log_denominator).mean())
        else:
            for p in positives[a]:
                terms.append(-(logits[a, p] - torch.logsumexp(torch.cat([logits[a, [p]], logits[a, negs]]), 0)))
    pos_count = sum(len(p) for p in positives.values())
    if not terms or neg_count == 0 or (pos_count <= 1 and neg_count <= 1):
        return embeddings.sum() * 0
    losses = torch.stack(terms)
    if cfg.name == "supcon":  # AvgNonZeroReducer over anchors
        return losses.sum() / (losses > 0).sum().clamp(min=1)
    return losses.mean()  # one term per positive pair
