"""Held-out evaluation of a model on a shard split: retrieval for labeled items, verification and query→document
retrieval in both directions for pairs (`retrieval_a2b/…`, `retrieval_b2a/…`), triplet accuracy for triplets.

Every worker takes part: each embeds its own contiguous share of the split (`eval_batches(rank=, world_size=)`),
the shares are gathered in rank order (so every worker holds the split in index order), and each worker scores
its share of the retrieval queries against all items; the per-query scores are gathered and averaged in one
order. Every worker returns the same metrics, equal to one process's; the work per worker falls with the
number of workers, and none waits in a collective while another embeds the whole split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.config import Config
from trainer.data.formats import KIND_VIEWS
from trainer.data.preprocess import Preprocessor
from trainer.data.shardsets import open_data
from trainer.data.stream import eval_batches
from trainer.engine.step import TOWER_SIDE, content_ids, move_inputs
from trainer.evaluation import (
    cosine_scores,
    pair_retrieval_scores,
    retrieval_scores,
    retrieval_task,
    summarize_pair_retrieval,
    summarize_retrieval,
    triplet_from_scores,
    verification_from_scores,
)
from trainer.objectives.gather import Collective


@dataclass
class EmbeddedShare:
    """One worker's share of a split after the towers: float32 CPU embeddings and int64 labels per view, and
    the pairs' similar flags (float32)."""

    kind: str
    embeddings: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    similar: torch.Tensor | None
    content: dict[str, torch.Tensor] = field(default_factory=dict)
    """Pairs: content ids of each view's items (equal data, equal id), to deduplicate retrieval queries/documents."""


@torch.no_grad()
def embed_split(model: torch.nn.Module, shard_dir: str, cfg: Config, device: torch.device,
                collective: Collective | None = None,
                preprocessors: dict[str, Preprocessor] | None = None) -> EmbeddedShare:
    """This worker's share of a split, embedded (the whole split with one worker)."""
    collective = collective or Collective()
    index = open_data(shard_dir, cfg.data)
    kind = index.kind
    dtype = next(model.parameters()).dtype
    embedded: dict[str, list[torch.Tensor]] = {view: [] for view in KIND_VIEWS[kind]}
    # From the index, not from the batches: a rank with an empty share must still take part in every gather.
    labels: dict[str, list[torch.Tensor]] = {view: [] for view in KIND_VIEWS[kind]} if index.labels else {}
    similar: list[torch.Tensor] = []
    content: dict[str, list[torch.Tensor]] = {view: [] for view in KIND_VIEWS[kind]}
    was_training = model.training
    model.eval()
    try:
        for batch in eval_batches(shard_dir, cfg.data, batch_size=cfg.eval.batch_size, rank=collective.rank,
                                  world_size=collective.world_size, preprocessors=preprocessors):
            for view in KIND_VIEWS[kind]:
                inputs = move_inputs(batch["views"][view], device, dtype)
                embedded[view].append(model(inputs, TOWER_SIDE[view]).float().cpu())
                if kind == "pairs":  # hashed from the member bytes by the stream; else from the decoded inputs
                    given = batch.get("content")
                    content[view].append(given[view] if given else content_ids(batch["views"][view]))
            for view, value in batch.get("labels", {}).items():
                labels[view].append(value)
            if "similar" in batch:
                similar.append(batch["similar"])
    finally:
        model.train(was_training)
    return EmbeddedShare(kind, {v: _rows(t, torch.float32) for v, t in embedded.items()},
                         {v: _rows(t, torch.int64) for v, t in labels.items()},
                         _rows(similar, torch.float32) if kind == "pairs" else None,
                         {v: _rows(t, torch.int64) for v, t in content.items()} if kind == "pairs" else {})


def evaluate(model: torch.nn.Module, cfg: Config, device: torch.device, shard_dir: str | None = None,
             collective: Collective | None = None,
             preprocessors: dict[str, Preprocessor] | None = None) -> dict[str, float]:
    """Metrics of `model` on the held-out split (`data.test` unless `shard_dir` is given).

    With a `collective` of several workers, every worker must call this (it gathers); all return the same."""
    collective = collective or Collective()
    split = shard_dir or cfg.data.test
    assert split is not None
    share = embed_split(model, split, cfg, device, collective, preprocessors)
    if share.kind == "pairs":
        assert share.similar is not None
        scores = _gather_rows(collective, torch.from_numpy(cosine_scores(share.embeddings["a"], share.embeddings["b"])))
        similar = _gather_rows(collective, share.similar)
        return {**verification_from_scores(scores.numpy(), similar.numpy()),
                **pair_retrieval(share, similar, cfg.eval.recall_k, collective)}
    if share.kind == "triplets":
        anchor = share.embeddings["anchor"]
        positive = _gather_rows(collective, torch.from_numpy(cosine_scores(anchor, share.embeddings["positive"])))
        negative = _gather_rows(collective, torch.from_numpy(cosine_scores(anchor, share.embeddings["negative"])))
        return triplet_from_scores(positive.numpy(), negative.numpy())
    # Labeled: each held-out item queries all the others. (Pair/triplet splits repeat items across tuples, which
    # would make retrieval scores meaningless, so they get verification / triplet metrics instead.)
    embeddings = _gather_rows(collective, share.embeddings["input"])
    labels = _gather_rows(collective, share.labels["input"]) if "input" in share.labels else None
    if labels is None:
        return {}
    scores = retrieval_scores(embeddings, labels, cfg.eval.recall_k, share=collective.rank,
                              shares=collective.world_size)
    return summarize_retrieval(_gather_rows(collective, scores))


def pair_retrieval(share: EmbeddedShare, similar: torch.Tensor, recall_k: int,
                   collective: Collective) -> dict[str, float]:
    """Both directions of query→document retrieval on a pair split: `retrieval_a2b/…` (each distinct a queries
    every distinct b) and `retrieval_b2a/…`; every worker scores its share of the queries (see the module doc)."""
    embeddings = {view: _gather_rows(collective, share.embeddings[view]) for view in ("a", "b")}
    content = {view: _gather_rows(collective, share.content[view]) for view in ("a", "b")}
    metrics: dict[str, float] = {}
    for query, document in (("a", "b"), ("b", "a")):
        task = retrieval_task(content[query], content[document], similar)
        scores = pair_retrieval_scores(embeddings[query], embeddings[document], task, recall_k,
                                       share=collective.rank, shares=collective.world_size)
        metrics.update(summarize_pair_retrieval(_gather_rows(collective, scores), recall_k,
                                                f"retrieval_{query}2{document}"))
    return metrics


def _rows(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)


def _gather_rows(collective: Collective, rows: torch.Tensor) -> torch.Tensor:
    """Every worker's rows, in rank order; a worker with no rows (more workers than samples) still takes part,
    with the width the others agree on."""
    if collective.world_size == 1:
        return rows
    width = int(collective.max(torch.tensor(rows.shape[1] if rows.dim() > 1 else 0, dtype=torch.int64)))
    if width and len(rows) == 0:
        rows = rows.new_zeros((0, width))
    return collective.gather_rows(rows)
