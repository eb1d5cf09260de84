"""The only collectives of the loss path: gather embeddings with autograd, gather labels, sum counters.

`gather_with_grad` is what makes the cross-worker loss exact: every worker holds the embeddings of all workers
as references, and the backward of the gather sends each worker the gradient that every other worker's loss
put on its embeddings. With one process every operation is the identity, so the same code runs everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives


class Collective:
    """Collectives over the workers of a run; this base class is the single-process case."""

    rank = 0
    world_size = 1

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """All workers' `tensor`s concatenated along dim 0, rank order; gradients flow back to each owner."""
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All workers' `tensor`s concatenated along dim 0, without autograd."""
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over workers, without autograd."""
        return tensor


class ProcessGroupCollective(Collective):
    """Collectives over the default torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = dist.distributed_c10d._get_default_group()

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        # Functional collectives carry autograd: the backward is a reduce-scatter of the gradients.
        return functional_collectives.all_gather_single_autograd(tensor.contiguous(), 0, self.group)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous())
        return torch.cat(parts, dim=0)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total


def default_collective() -> Collective:
    """The process-group collective when torch.distributed is initialised with >1 rank, else the identity."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollective()
    return Collective()
