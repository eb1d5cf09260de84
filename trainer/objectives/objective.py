"""The metric-learning objective over the global batch: local anchors against the references of all workers.

Each worker embeds its local batch (B_local rows) and gathers every worker's rows with autograd (B_global
references, plus the cross-batch memory when it is on). It then walks its anchors in chunks of
`loss.chunk_entries` / R rows: a chunk's distances to all references ([chunk, R], never B_local × R), PML's
mining decided row by row (selection.py), the loss terms (terms.py), and the gradient of those terms with respect to the
chunk and the references, right away. Only the gradients (B_local × d and R × d) outlive a chunk, so the
memory of loss + mining is bounded by the chunk size, not the global batch.

The terms are reduced with global counts: the workers' shares add up to exactly the loss one process would
compute on the whole global batch, and so do their gradients (the train step multiplies by the world size to
undo data-parallel gradient averaging).

Index tuples follow PML: pairs are (anchor, positive, anchor, negative), triplets (anchor, positive,
negative); explicit tuples index the local batch. With `mining.name: none`, SupCon and InfoNCE add in-batch
negatives to explicit tuples: every reference of the global batch (and memory) that is not a positive of the
anchor (its class, its explicit positives, their content) — how text and image–text embeddings are trained.
Labels of pairs and triplets are [N, 2]: (class id, content id), so duplicates of an item are never negatives.

`loss.name: clip` takes its own path (clip.py): CLIP's symmetric loss over the a and b sides of pair batches,
with the model's learnable logit_scale; same gather, same memory bank, same exactness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.clip import ClipLoss
from trainer.objectives.gather import Collective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.selection import (
    Block,
    IndexTuple,
    Part,
    everything,
    explicit_part,
    mine,
    with_in_batch_negatives,
)
from trainer.objectives.terms import BlockLoss


@dataclass
class ObjectiveOutput:
    """What one step's objective produced."""

    local_share: torch.Tensor
    """This worker's part of the global loss (the shares of all workers sum to it); differentiable."""
    loss: torch.Tensor
    """The global loss, equal on every worker (detached)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Global counters worth logging: tuples used, fraction of anchors with a positive among the references."""


@dataclass
class _Accumulated:
    """Per-component sums, counts and gradients over the chunks of one step."""

    anchors: torch.Tensor
    references: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    tuples: dict[str, torch.Tensor] = field(default_factory=dict)
    with_positive: int = 0

    def add(self, table: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        table[name] = table[name] + value if name in table else value

    def add_gradients(self, name: str, rows: slice, anchors: torch.Tensor, references: torch.Tensor) -> None:
        if name not in self.anchor_grads:
            self.anchor_grads[name] = torch.zeros_like(self.anchors)
            self.reference_grads[name] = torch.zeros_like(self.references)
        self.anchor_grads[name][rows] += anchors
        self.reference_grads[name] += references


class MetricObjective:
    """Loss + miner from the config, evaluated for local anchors against the global batch (and memory)."""

    def __init__(self, loss_cfg: LossConfig, mining_cfg: MiningConfig, collective: Collective,
                 memory: MemoryBank | None = None) -> None:
        self.loss = BlockLoss(loss_cfg)
        self.clip = ClipLoss(loss_cfg.chunk_entries) if loss_cfg.name == "clip" else None
        self.clip_logit_scale = math.log(1.0 / loss_cfg.clip_temperature)
        """logit_scale of clip when the caller passes none (a model without the parameter): fixed, not learned."""
        self.mining_cfg = mining_cfg
        self.chunk_entries = loss_cfg.chunk_entries
        self.collective = collective
        self.memory = memory
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        """The last call's gathered batch, waiting for `commit_memory` (the step was kept) or `discard_memory`."""

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 explicit: IndexTuple | None = None, logit_scale: torch.Tensor | None = None) -> ObjectiveOutput:
        """Loss of `embeddings` (local rows) with `labels` ([N] class ids, or [N, 2] class and content ids);
        `explicit` tuples index the local batch; `logit_scale` is the model's (clip only, else ignored)."""
        embeddings = embeddings.float()
        if self.clip is not None:
            return self._clip(embeddings, labels, explicit, logit_scale)
        gathered = self.collective.gather_with_grad(embeddings)
        gathered_labels = self.collective.gather(labels)
        references, reference_labels = gathered, gathered_labels
        if self.memory is not None and self.memory.ready:
            references = torch.cat([gathered, self.memory.embeddings.to(gathered.device)])
            reference_labels = torch.cat([gathered_labels, self.memory.labels.to(labels.device)])
        offset = self.collective.rank * len(embeddings)
        if explicit is not None:
            explicit = shift_partners(explicit, offset)
        distance = self.loss.distance
        results: dict[str, torch.Tensor] = {}

        def evaluate(anchors: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            acc = _Accumulated(anchors, refs)
            refs = refs.detach().requires_grad_()
            chunk_rows = max(1, self.chunk_entries // max(1, len(refs)))
            for start in range(0, len(anchors), chunk_rows):
                rows = slice(start, min(start + chunk_rows, len(anchors)))
                chunk = anchors[rows].detach().requires_grad_()
                self._chunk(chunk, refs, labels[rows], reference_labels, offset + start, explicit, rows, acc)
            return self._reduce(acc, len(labels), results)

        share = _BlockwiseLoss.apply(distance.maybe_normalize(embeddings), distance.maybe_normalize(references),
                                     evaluate)
        # The backward of the gather is a collective: keep it in every worker's graph, even when this worker's
        # anchors produced no loss terms, or the other workers would wait for it forever.
        share = share + 0.0 * gathered.sum()
        if self.memory is not None:  # banked only once the ranks agreed to keep the step (commit_memory)
            self.pending = (gathered.detach(), gathered_labels)
        loss = results.pop("loss")
        return ObjectiveOutput(share, loss, {name: float(value) for name, value in results.items()})

    def _clip(self, embeddings: torch.Tensor, labels: torch.Tensor, explicit: IndexTuple | None,
              logit_scale: torch.Tensor | None) -> ObjectiveOutput:
        """CLIP's loss (clip.py) of a local pair batch [a; b]; the memory banks each row with its side."""
        assert self.clip is not None
        if explicit is None or len(explicit) != 4 or labels.dim() != 2:
            raise ValueError("loss.name: clip needs pair shards (explicit (a, b) pairs and [N, 2] labels)")
        gathered = self.collective.gather_with_grad(embeddings)
        gathered_labels = self.collective.gather(labels)
        batch = len(embeddings) // 2
        sides = (torch.arange(len(gathered), device=labels.device) // batch) % 2
        banked = (self.memory.embeddings, self.memory.labels) if self.memory is not None and self.memory.ready \
            else None
        if logit_scale is None:
            logit_scale = embeddings.new_tensor(self.clip_logit_scale)
        share, stats = self.clip(embeddings, gathered, labels, gathered_labels, explicit[0], self.collective.rank,
                                 logit_scale, self.collective.sum, banked)
        share = share + 0.0 * gathered.sum()  # keep the gather's collective backward in every worker's graph
        if self.memory is not None:
            self.pending = (gathered.detach(), torch.cat([gathered_labels, sides[:, None]], dim=1))
        loss = torch.tensor(stats.pop("loss"), device=embeddings.device)
        return ObjectiveOutput(share, loss, stats)

    def commit_memory(self) -> None:
        """Enqueue the last call's global batch into the cross-batch memory: the step was kept on every rank.

        Called after the ranks' agreement, never before: a skipped non-finite step would otherwise leave NaN
        rows in the bank, and every following loss would be NaN until they aged out. Non-finite rows are never
        banked (every rank drops the same rows: the gathered batch is identical on every rank)."""
        if self.memory is None or self.pending is None:
            return
        embeddings, labels = self.pending
        self.pending = None
        finite = torch.isfinite(embeddings).all(dim=1)
        self.memory.enqueue(embeddings[finite], labels[finite])

    def discard_memory(self) -> None:
        """Forget the last call's batch: the step was skipped."""
        self.pending = None

    def _chunk(self, anchors: torch.Tensor, references: torch.Tensor, labels: torch.Tensor,
               reference_labels: torch.Tensor, first: int, explicit: IndexTuple | None, rows: slice,
               acc: _Accumulated) -> None:
        """Mine, compute the terms and their gradients for one chunk of anchors; keep only the gradients."""
        with torch.enable_grad():
            mat = self.loss.distance.compute_mat(anchors, references)
        leaf = mat.detach().requires_grad_()
        block = _block(mat.detach(), labels, reference_labels, first, self.loss.distance.is_inverted)
        acc.with_positive += int(block.positive.any(dim=1).sum())
        grad_mats: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            for piece in self.loss.pieces(leaf, block, self._parts(block, explicit, rows)):
                for kind, count in piece.tuples.items():
                    acc.add(acc.tuples, kind, count.detach())
                for name, (total, count) in piece.terms.items():
                    acc.add(acc.sums, name, total.detach())
                    acc.add(acc.counts, name, count.detach().to(total.dtype))
                    if total.requires_grad:
                        acc.add(grad_mats, name, torch.autograd.grad(total, leaf, retain_graph=True)[0])
            for name, grad_mat in grad_mats.items():
                grad_anchors, grad_references = torch.autograd.grad(mat, (anchors, references), grad_mat,
                                                                    retain_graph=True)
                acc.add_gradients(name, rows, grad_anchors, grad_references)

    def _parts(self, block: Block, explicit: IndexTuple | None, rows: slice) -> list[Part]:
        """The chunk's selections: the shard's explicit tuples, then mined ones; every pair if neither."""
        parts: list[Part] = []
        if explicit is not None:
            own = explicit_part(explicit, rows.start, rows.stop, block)
            if self.loss.in_batch_negatives and self.mining_cfg.name == "none":
                own = with_in_batch_negatives(own, block)
            parts.append(own)
        mined = mine(block, self.mining_cfg)
        if mined is not None:
            parts.append(mined)
        return parts or [everything(block, self.loss.triplets)]

    def _reduce(self, acc: _Accumulated, local_rows: int, results: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global counts → this worker's share of the loss and its gradients; fills `results` (loss, stats)."""
        names, kinds = self.loss.components, self.loss.tuple_kinds
        zero = acc.anchors.new_zeros(())
        local = torch.stack([acc.sums.get(n, zero) for n in names] + [acc.counts.get(n, zero) for n in names]
                            + [acc.tuples.get(k, zero).to(zero.dtype) for k in kinds]
                            + [zero + acc.with_positive, zero + local_rows])
        total = self.collective.sum(local)  # one collective, laid out the same on every worker
        sums, counts = total[:len(names)], total[len(names):2 * len(names)].clamp(min=1)
        tuples = dict(zip(kinds, total[2 * len(names):-2], strict=True))
        active = float(self.loss.active(tuples))
        share, grad_anchors, grad_references = zero.clone(), torch.zeros_like(acc.anchors), \
            torch.zeros_like(acc.references)
        for name, count in zip(names, counts, strict=True):
            scale = active / count
            share += acc.sums.get(name, zero) * scale
            if name in acc.anchor_grads:  # a worker whose chunks had no terms of it has no gradient
                grad_anchors += acc.anchor_grads[name] * scale
                grad_references += acc.reference_grads[name] * scale
        results["loss"] = (sums / counts).sum() * active
        results["tuples"] = sum(tuples.values(), zero)
        results["anchors_with_positive"] = total[-2] / total[-1].clamp(min=1)
        return share, grad_anchors, grad_references


class _BlockwiseLoss(torch.autograd.Function):
    """Autograd node whose forward computes the loss and its input gradients chunk by chunk (see module doc)."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, references: torch.Tensor,  # type: ignore[override]
                evaluate: Callable) -> torch.Tensor:
        share, grad_anchors, grad_references = evaluate(anchors, references)
        ctx.save_for_backward(grad_anchors, grad_references)
        return share

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_anchors, grad_references = ctx.saved_tensors
        return grad_anchors * grad_output, grad_references * grad_output, None


def _block(mat: torch.Tensor, labels: torch.Tensor, reference_labels: torch.Tensor, first: int,
           inverted: bool) -> Block:
    """Positives and negatives of a chunk by class id; labels [N, 2] also carry content ids (pairs, triplets),
    and an item with the anchor's content is never its negative."""
    classes, content = split_labels(labels)
    reference_classes, reference_content = split_labels(reference_labels)
    same = classes[:, None] == reference_classes[None, :]
    negative = ~same
    if content is not None and reference_content is not None:
        negative &= content[:, None] != reference_content[None, :]
    rows = torch.arange(len(labels), device=labels.device)
    same[rows, first + rows] = False  # an anchor is never its own positive
    return Block(mat, same, negative, inverted, reference_content)


def split_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class ids [N] and content ids [N] (None) of labels [N, 2] (class id, content id), or of class ids [N]."""
    return (labels[:, 0], labels[:, 1]) if labels.dim() == 2 else (labels, None)


def shift_partners(tuples: IndexTuple, offset: int) -> IndexTuple:
    """Local-batch tuples → anchors stay local, partners become positions among the global references."""
    anchors_at = (0,) if len(tuples) == 3 else (0, 2)
    return tuple(t if i in anchors_at else t + offset for i, t in enumerate(tuples))
