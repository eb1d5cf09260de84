"""Held-out evaluation of a model on a shard split: retrieval for labeled items, verification for pairs,
triplet accuracy for triplets."""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.data.formats import KIND_VIEWS, read_index
from trainer.data.stream import eval_batches
from trainer.engine.step import TOWER_SIDE, move_inputs
from trainer.evaluation import retrieval_metrics, triplet_metrics, verification_metrics


@torch.no_grad()
def embed_split(model: torch.nn.Module, shard_dir: str, cfg: Config,
                device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Embeddings per view (float32, CPU) of every sample of a split, its labels per view, and `similar`."""
    kind = read_index(shard_dir).kind
    dtype = next(model.parameters()).dtype
    embedded: dict[str, list[torch.Tensor]] = {view: [] for view in KIND_VIEWS[kind]}
    labels: dict[str, list[torch.Tensor]] = {}
    similar: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    for batch in eval_batches(shard_dir, cfg.data, batch_size=cfg.eval.batch_size):
        for view in KIND_VIEWS[kind]:
            inputs = move_inputs(batch["views"][view], device, dtype)
            embedded[view].append(model(inputs, TOWER_SIDE[view]).float().cpu())
        for view, value in batch.get("labels", {}).items():
            labels.setdefault(view, []).append(value)
        if "similar" in batch:
            similar.append(batch["similar"])
    model.train(was_training)
    extra = {"similar": torch.cat(similar)} if similar else {}
    return ({v: torch.cat(t) for v, t in embedded.items()}, {v: torch.cat(t) for v, t in labels.items()},
            {"kind": kind, **extra})


def evaluate(model: torch.nn.Module, cfg: Config, device: torch.device,
             shard_dir: str | None = None) -> dict[str, float]:
    """Metrics of `model` on the held-out split (`data.test` unless `shard_dir` is given)."""
    split = shard_dir or cfg.data.test
    assert split is not None
    embeddings, labels, extra = embed_split(model, split, cfg, device)
    metrics: dict[str, float] = {}
    kind = extra["kind"]
    if kind == "pairs":
        metrics.update(verification_metrics(embeddings["a"], embeddings["b"], extra["similar"]))
    if kind == "triplets":
        metrics.update(triplet_metrics(embeddings["anchor"], embeddings["positive"], embeddings["negative"]))
    if kind == "labeled":
        # Each held-out item queries all the others. (Pair/triplet splits repeat items across tuples, which
        # would make retrieval scores meaningless, so they get verification / triplet metrics instead.)
        metrics.update(retrieval_metrics(embeddings["input"], labels["input"], recall_k=cfg.eval.recall_k))
    return metrics
