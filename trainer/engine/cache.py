"""The feature-cache step (GradCache): a contrastive batch as large as you like at the activation memory of a
micro-batch, with exactly the gradients of one full-batch step.

1. Embed the step's batch in micro-batches without autograd, remembering each micro-batch's RNG state.
2. Take the objective on all embeddings at once (every row is a negative for every other) and the gradient of
   the loss with respect to the embeddings — the gather's backward included, so other workers' anchors count.
3. Replay each micro-batch with autograd from its saved RNG state (dropout draws the same masks) and
   backpropagate its slice of that gradient into the parameters; DeepSpeed reduces once, at `engine.step()`
   (its `managed_gradient_accumulation: false` mode: the caller owns the accumulation boundary and calls
   `engine.step()` once the ranks agreed that the step is finite).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from trainer.data.formats import KIND_VIEWS, TextBatch, TokenBatch
from trainer.engine.step import embed_views, explicit_tuples, stacked_labels
from trainer.objectives.objective import ObjectiveOutput

Objective = Callable[..., ObjectiveOutput]


def micro_batch_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` nearly equal micro-batches of `size` samples."""
    edges = [round(i * size / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def sample_rows(batch: dict, start: int, stop: int) -> dict:
    """The samples [start, stop) of a streamed batch, every view sliced alike."""
    views = {view: (value.rows(start, stop) if isinstance(value, TextBatch | TokenBatch) else value[start:stop])
             for view, value in batch["views"].items()}
    rows = {**batch, "views": views, "keys": batch["keys"][start:stop],
            "content": {view: value[start:stop] for view, value in batch.get("content", {}).items()},
            "labels": {view: value[start:stop] for view, value in batch.get("labels", {}).items()}}
    if "similar" in batch:
        rows["similar"] = batch["similar"][start:stop]
    return rows


def cached_step(engine, batch: dict, kind: str, device: torch.device, dtype: torch.dtype, objective: Objective,
                micro_batches: int, world_size: int) -> ObjectiveOutput:
    """One training step through the feature cache: parameters get the full-batch gradient; the caller steps (after
    the ranks agree that the loss and gradients are finite)."""
    size, views = len(batch["keys"]), len(KIND_VIEWS[kind])
    bounds = micro_batch_bounds(size, micro_batches)
    states, cached = [], []
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            cached.append(embed_views(engine, sample_rows(batch, start, stop), kind, device, dtype))
    # Micro-batches are view-major ([view 0 rows; view 1 rows; ...]); the objective wants the whole batch so.
    embeddings = torch.cat([part.view(views, -1, part.shape[-1]) for part in cached], dim=1)
    embeddings = embeddings.reshape(views * size, -1).detach().requires_grad_()
    labels = stacked_labels(batch, kind, size).to(device)
    # The model's own loss parameters (clip's logit_scale) get their gradient with the first replayed micro-batch.
    logit_scale = getattr(engine.module, "logit_scale", None)
    out = objective(embeddings, labels, explicit_tuples(batch, kind, size, device), logit_scale=logit_scale)
    # Each worker's share sums to the global loss; DeepSpeed averages gradients over workers, so scale back.
    wanted = [embeddings] + ([logit_scale] if logit_scale is not None else [])
    embedding_grads, *scale_grad = torch.autograd.grad(out.local_share * world_size, wanted, allow_unused=True)
    embedding_grads = embedding_grads.view(views, size, -1)
    for (start, stop), state in zip(bounds, states, strict=True):
        with _replaying(state, device):
            replayed = embed_views(engine, sample_rows(batch, start, stop), kind, device, dtype)
        target = embedding_grads[:, start:stop].reshape(replayed.shape).to(replayed.dtype)
        surrogate = (replayed * target).sum()
        if logit_scale is not None and scale_grad and scale_grad[0] is not None:
            surrogate = surrogate + (logit_scale * scale_grad.pop()).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
    return out


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replaying(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Run with the RNG as it was for the first pass, then put the RNG back where the step left it."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
