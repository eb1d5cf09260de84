"""Cross-batch memory (XBM): embeddings of past global batches kept as extra references for mining and loss.

Every worker enqueues the same gathered global batch after each step, so the bank is identical on every rank
without any extra communication (PML's CrossBatchMemory keeps a per-process queue, which diverges across ranks).
Banked rows carry no gradient: they are references only, as in XBM. The bank is part of a run's state: it is
saved with every checkpoint and restored on resume (safetensors, never pickle).
"""

from __future__ import annotations

import torch


class MemoryBank:
    """The newest `size` reference rows and labels, oldest first; used once `start_step` steps have been banked."""

    def __init__(self, size: int, start_step: int = 0) -> None:
        self.size, self.start_step = size, start_step
        self.embeddings = torch.zeros(0, 0)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.steps = 0
        """Global batches enqueued so far (the training steps the bank has seen)."""

    @property
    def ready(self) -> bool:
        """Whether the bank holds rows and its warm-up (`start_step`) is over."""
        return self.steps >= self.start_step and len(self.embeddings) > 0

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a global batch (detached), dropping the oldest rows beyond `size`."""
        stored = embeddings.detach().float()
        if len(self.embeddings):
            stored = torch.cat([self.embeddings.to(stored.device), stored])
            labels = torch.cat([self.labels.to(labels.device), labels])
        self.embeddings, self.labels = stored[-self.size:].clone(), labels[-self.size:].clone()
        self.steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors for safetensors."""
        return {"embeddings": self.embeddings.cpu().contiguous(), "labels": self.labels.cpu().contiguous(),
                "steps": torch.tensor([self.steps], dtype=torch.long)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned; rows beyond this bank's size are dropped (oldest first)."""
        self.embeddings = state["embeddings"].float()[-self.size:]
        self.labels = state["labels"].long()[-self.size:]
        self.steps = int(state["steps"][0])
