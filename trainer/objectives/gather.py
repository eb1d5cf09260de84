"""Every collective of a run, in one device-aware place: the loss's gather with autograd, agreement flags,
checkpoint agreement, counters and evaluation gathers.

`gather_with_grad` is what makes the cross-worker loss exact: every worker holds the embeddings of all workers
as references, and the backward of the gather sends each worker the gradient that every other worker's loss
put on its embeddings. With one process every operation is the identity, so the same code runs everywhere.

Device: under Ray or torchrun on GPUs the process group is NCCL, which reduces CUDA tensors only, while the
callers hold CPU tensors (flags, counters, labels) as often as CUDA ones. Each operation here moves its
input to the group's device and hands the result back on the caller's device, so no caller needs to know
the backend. A test keeps every other module of `trainer/` free of collective calls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives


def group_device(backend: str, cuda_device: int | None) -> torch.device | None:
    """Where a collective's tensors must be for a group with `backend`; None when any device will do.

    `nccl` takes CUDA tensors only; `gloo` (and the fake test backends) CPU tensors; a mixed group such as
    `cpu:gloo,cuda:nccl` routes each tensor by its own device."""
    parts = {part.split(":")[-1] for part in backend.lower().split(",")}
    if parts == {"nccl"}:
        if cuda_device is None:
            raise RuntimeError("an NCCL process group needs a CUDA device in this process")
        return torch.device("cuda", cuda_device)
    if "nccl" in parts:
        return None
    return torch.device("cpu")


class Collective:
    """Collectives over the workers of a run; this base class is the single-process case."""

    rank = 0
    world_size = 1
    device: torch.device | None = None

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """All workers' `tensor`s concatenated along dim 0, rank order; gradients flow back to each owner."""
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All workers' `tensor`s (same shape on every worker) concatenated along dim 0, without autograd."""
        return tensor

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """All workers' `tensor`s concatenated along dim 0, rank order, where each worker may hold a different
        number of rows (evaluation shares); without autograd."""
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over workers, without autograd."""
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over workers, without autograd (agreement flags)."""
        return tensor

    def barrier(self) -> None:
        """Wait until every worker got here."""


class ProcessGroupCollective(Collective):
    """Collectives over the default torch.distributed process group (gloo on CPU, NCCL on GPU, or both)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = dist.distributed_c10d._get_default_group()
        cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.device = group_device(str(dist.get_backend(self.group)), cuda)

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device is None else tensor.to(self.device)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        # Functional collectives carry autograd: the backward is a reduce-scatter of the gradients. `.to` is
        # differentiable, so gradients come back to the caller's device too.
        gathered = functional_collectives.all_gather_single_autograd(self._placed(tensor).contiguous(), 0, self.group)
        return gathered.to(tensor.device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        placed = self._placed(tensor.detach()).contiguous()
        parts = [torch.empty_like(placed) for _ in range(self.world_size)]
        dist.all_gather(parts, placed)
        return torch.cat(parts, dim=0).to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(self.world_size, dtype=torch.long)
        counts[self.rank] = len(tensor)
        counts = self.sum(counts)
        longest = int(counts.max())
        padded = tensor.detach().new_zeros((longest, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor.detach()
        gathered = self.gather(padded).view(self.world_size, longest, *tensor.shape[1:])
        return torch.cat([gathered[rank, :int(count)] for rank, count in enumerate(counts.tolist())])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        # An all-reduce rather than dist.barrier(): NCCL's barrier has to guess a device per rank.
        self.sum(torch.zeros(1))

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        total = self._placed(tensor.detach()).clone()
        dist.all_reduce(total, op=op)
        return total.to(tensor.device)


def default_collective() -> Collective:
    """The process-group collective when torch.distributed is initialised with >1 rank, else the identity."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollective()
    return Collective()
