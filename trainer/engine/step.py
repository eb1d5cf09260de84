"""From a streamed batch to (embeddings, labels, explicit tuples) over the local batch.

Views are stacked in the order of `KIND_VIEWS`: labeled → [input], pairs → [a, b], triplets →
[anchor, positive, negative]. Side "a" (tower A) embeds `input`, `a` and `anchor`; side "b" the rest, so a
pseudo-Siamese model maps each side through its own tower. Pairs and triplets become PML index tuples over the
stacked batch. Without class ids, each pair/triplet gets its own ids from its sample key (positives share one,
negatives differ), so in-batch items of other tuples act as negatives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from trainer.data.formats import KIND_VIEWS, TextBatch

TOWER_SIDE = {"input": "a", "a": "a", "anchor": "a", "b": "b", "positive": "b", "negative": "b"}


@dataclass
class EmbeddedBatch:
    """A local batch after the towers."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    explicit: tuple[torch.Tensor, ...] | None


def move_inputs(inputs: torch.Tensor | TextBatch, device: torch.device, dtype: torch.dtype) -> torch.Tensor | TextBatch:
    """Inputs onto the device; floating-point inputs in the model's dtype (bf16 under DeepSpeed bf16)."""
    if isinstance(inputs, TextBatch):
        return inputs.to(device)
    return inputs.to(device, dtype=dtype if inputs.is_floating_point() else inputs.dtype, non_blocking=True)


def embed_batch(model: torch.nn.Module, batch: dict, kind: str, device: torch.device,
                dtype: torch.dtype) -> EmbeddedBatch:
    """Run every view of `batch` through its tower; build labels and the shard's explicit tuples."""
    embeddings = embed_views(model, batch, kind, device, dtype)
    size = len(batch["keys"])
    labels = stacked_labels(batch, kind, size).to(device)
    return EmbeddedBatch(embeddings, labels, explicit_tuples(batch, kind, size, device))


def embed_views(model: torch.nn.Module, batch: dict, kind: str, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """Embeddings of every view of `batch`, stacked view-major in `KIND_VIEWS` order."""
    return torch.cat([model(move_inputs(batch["views"][v], device, dtype), TOWER_SIDE[v]) for v in KIND_VIEWS[kind]])


def stacked_labels(batch: dict, kind: str, size: int) -> torch.Tensor:
    """Class ids of the stacked views; synthesized from sample keys where the shards carry none."""
    views = KIND_VIEWS[kind]
    given = batch.get("labels", {})
    if all(v in given for v in views):
        return torch.cat([given[v] for v in views]).long()
    if kind == "labeled":
        raise ValueError("labeled shards without class ids cannot be trained on")
    own = torch.tensor([key_id(key) for key in batch["keys"]], dtype=torch.long)
    other = own + 1  # key ids are even, so +1 never collides with another tuple's id
    if kind == "pairs":
        similar = batch["similar"] > 0.5
        return torch.cat([own, torch.where(similar, own, other)])
    return torch.cat([own, own, other])


def explicit_tuples(batch: dict, kind: str, size: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """PML index tuples of the shard's own pairs/triplets over the stacked local batch."""
    first = torch.arange(size, device=device)
    if kind == "pairs":
        similar = (batch["similar"] > 0.5).to(device)
        return first[similar], first[similar] + size, first[~similar], first[~similar] + size
    if kind == "triplets":
        return first, first + size, first + 2 * size
    return None


def key_id(key: str) -> int:
    """A stable, even, non-negative 62-bit id for a sample key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 2) << 1
