"""CLIP's symmetric InfoNCE with a learnable temperature (`loss.name: clip`), exact over the global batch.

For pair shards (a_i, b_i): logits = exp(logit_scale) · A·Bᵀ over the a and b sides of every worker's batch;
the loss is (cross-entropy over rows + cross-entropy over columns) / 2, the target of a_i being b_i and of b_i
being a_i — open_clip's `ClipLoss` when every pair is similar and no item repeats. logit_scale is a parameter of
the model (`EmbeddingModel.logit_scale`), initialised to log(1/`loss.clip_temperature`) and used clamped to
≤ log(100), as open_clip clamps it (here in the forward pass, so that no in-place edit is needed on DeepSpeed's
master copy: beyond the clamp its gradient is zero).

Which pairs and candidates, consistent with InfoNCE's in-batch negatives (objective.py):
  - only similar pairs are anchors (a row for a_i, a column for b_i); a dissimilar pair's a and b are only
    negatives, in the other side's softmax;
  - a candidate is left out of an anchor's softmax (never a negative) when it shares the anchor's class, or
    holds the content of the anchor or of the anchor's target: the same caption in two pairs, or the same image
    paired with two captions, is not a negative of either pair (open_clip counts such duplicates as negatives).
  - the cross-batch memory adds past global batches as extra candidates: banked b's for the rows, banked a's
    for the columns (never anchors, no gradient).

Computation: each worker takes the rows of its own a's against all b's (and memory), then the columns of its
own b's against all a's, `loss.chunk_entries` logits at a time; a chunk's gradients with respect to its anchors,
the candidates and logit_scale are taken right away, so memory is bounded by the chunk, never (global batch)².
Shares are divided by the global number of similar pairs: they sum to the global loss, and so do gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOGIT_SCALE_MAX = math.log(100.0)
"""open_clip's clamp of logit_scale: the temperature never falls below 0.01."""


def clip_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) with logit_scale clamped to ≤ log(100), in float32."""
    return logit_scale.float().clamp(max=LOGIT_SCALE_MAX).exp()


def side_positions(world: int, batch: int, side: int, device: torch.device) -> torch.Tensor:
    """Rows of side `side` (0: a, 1: b) in a gathered batch laid out [a_0; b_0; a_1; b_1; ...] (B rows each)."""
    starts = torch.arange(world, device=device) * 2 * batch + side * batch
    return (starts[:, None] + torch.arange(batch, device=device)).flatten()


class ClipLoss:
    """The symmetric loss of local anchors against the global batch (see the module docstring)."""

    def __init__(self, chunk_entries: int) -> None:
        self.chunk_entries = chunk_entries

    def __call__(self, embeddings: torch.Tensor, gathered: torch.Tensor, labels: torch.Tensor,
                 gathered_labels: torch.Tensor, similar: torch.Tensor, rank: int, logit_scale: torch.Tensor,
                 reduce: Callable[[torch.Tensor], torch.Tensor],
                 memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """This worker's share of the loss (differentiable in `embeddings`, `gathered` and `logit_scale`) and the
        global loss and counts. `embeddings` [2B, D] are this worker's [a; b] rows with `labels` [2B, 2] (class,
        content); `gathered` [W·2B, D] every worker's; `similar` the local positions of similar pairs; `reduce`
        sums a tensor over workers; `memory` banked rows and labels [M, 3] (class, content, side)."""
        stats: dict[str, float] = {}

        def evaluate(local: torch.Tensor, refs: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self._evaluate(local, refs, scale, labels, gathered_labels, similar, rank, reduce, memory, stats)

        share = _ClipFunction.apply(F.normalize(embeddings, dim=1), F.normalize(gathered, dim=1), logit_scale,
                                    evaluate)
        return share, stats

    def _evaluate(self, local: torch.Tensor, refs: torch.Tensor, logit_scale: torch.Tensor, labels: torch.Tensor,
                  gathered_labels: torch.Tensor, similar: torch.Tensor, rank: int,
                  reduce: Callable[[torch.Tensor], torch.Tensor], memory: tuple[torch.Tensor, torch.Tensor] | None,
                  stats: dict[str, float]) -> tuple[torch.Tensor, ...]:
        batch = len(local) // 2
        world = len(refs) // (2 * batch)
        theta = logit_scale.detach().requires_grad_()
        grad_local, grad_refs = torch.zeros_like(local), torch.zeros_like(refs)
        grad_theta = torch.zeros_like(theta)
        sums = []
        for side in (0, 1):  # rows: own a's against all b's; columns: own b's against all a's
            other = side_positions(world, batch, 1 - side, refs.device)
            candidates, candidate_labels = refs[other], gathered_labels[other]
            if memory is not None and len(memory[0]):
                banked = memory[1][:, 2] == 1 - side
                candidates = torch.cat([candidates, memory[0][banked].to(refs)])
                candidate_labels = torch.cat([candidate_labels, memory[1][banked, :2].to(candidate_labels)])
            candidates = candidates.detach().requires_grad_()
            anchors = side * batch + similar
            targets = rank * batch + similar
            total, g_anchors, g_candidates, g_theta = self._direction(
                local[anchors], candidates, labels[anchors], candidate_labels, targets, theta)
            sums.append(total)
            grad_local[anchors] += g_anchors
            grad_refs.index_add_(0, other, g_candidates[:len(other)])
            grad_theta += g_theta
        local_sums = torch.stack([*sums, sums[0].new_tensor(float(len(similar)))])
        global_sums = reduce(local_sums.detach())
        pairs = float(global_sums[2])
        scale = 1.0 / (2.0 * pairs) if pairs > 0 else 0.0
        stats.update(loss=float(global_sums[0] + global_sums[1]) * scale, pairs=pairs,
                     logit_scale=float(clip_scale(theta.detach())))
        share = (sums[0] + sums[1]).detach() * scale
        return share, grad_local * scale, grad_refs * scale, grad_theta * scale

    def _direction(self, anchors: torch.Tensor, candidates: torch.Tensor, anchor_labels: torch.Tensor,
                   candidate_labels: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ over `anchors` of −log softmax(target) among the allowed candidates, and its gradients."""
        total = anchors.new_zeros(())
        grad_anchors, grad_candidates = torch.zeros_like(anchors), torch.zeros_like(candidates)
        grad_theta = torch.zeros_like(theta)
        chunk_rows = max(1, self.chunk_entries // max(1, len(candidates)))
        target_content = candidate_labels[targets, 1]
        for start in range(0, len(anchors), chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = anchors[rows].detach().requires_grad_()
            allowed = _allowed(anchor_labels[rows], candidate_labels, target_content[rows], targets[rows])
            with torch.enable_grad():
                logits = clip_scale(theta) * chunk @ candidates.T
                positive = logits.gather(1, targets[rows, None]).squeeze(1)
                losses = torch.logsumexp(logits.masked_fill(~allowed, -torch.inf), dim=1) - positive
                loss = losses.sum()
                g_chunk, g_candidates, g_theta = torch.autograd.grad(loss, (chunk, candidates, theta))
            total = total + loss.detach()
            grad_anchors[rows] = g_chunk
            grad_candidates += g_candidates
            grad_theta += g_theta
        return total, grad_anchors, grad_candidates, grad_theta


def _allowed(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor, target_content: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """[C, R]: the target, and every candidate of another class holding neither the anchor's nor the target's
    content."""
    allowed = candidate_labels[None, :, 0] != anchor_labels[:, None, 0]
    allowed &= candidate_labels[None, :, 1] != anchor_labels[:, None, 1]
    allowed &= candidate_labels[None, :, 1] != target_content[:, None]
    allowed[torch.arange(len(targets), device=targets.device), targets] = True
    return allowed


class _ClipFunction(torch.autograd.Function):
    """Autograd node whose forward computes the share and its input gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, refs: torch.Tensor, logit_scale: torch.Tensor,  # type: ignore[override]
                evaluate: Callable) -> torch.Tensor:
        share, grad_local, grad_refs, grad_theta = evaluate(local, refs, logit_scale)
        ctx.save_for_backward(grad_local, grad_refs, grad_theta)
        return share

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_local, grad_refs, grad_theta = ctx.saved_tensors
        return grad_local * grad_output, grad_refs * grad_output, grad_theta * grad_output, None
