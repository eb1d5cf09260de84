"""From a streamed batch to (embeddings, labels, explicit tuples) over the local batch.

Views are stacked in the order of `KIND_VIEWS`: labeled → [input], pairs → [a, b], triplets →
[anchor, positive, negative]. Side "a" (tower A) embeds `input`, `a` and `anchor`; side "b" the rest, so a
pseudo-Siamese model maps each side through its own tower. Pairs and triplets become PML index tuples over the
stacked batch. Without class ids, each pair/triplet gets its own ids from its sample key (positives share one,
negatives differ), so in-batch items of other tuples act as negatives; the labels of pairs and triplets also
carry a content id per item, so duplicates of an item are never its negatives (see `stacked_labels`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from trainer.data.formats import KIND_VIEWS, TextBatch, TokenBatch
from trainer.data.preprocess import ModelInput

TOWER_SIDE = {"input": "a", "a": "a", "anchor": "a", "b": "b", "positive": "b", "negative": "b"}


@dataclass
class EmbeddedBatch:
    """A local batch after the towers."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    explicit: tuple[torch.Tensor, ...] | None


def move_inputs(inputs: ModelInput, device: torch.device, dtype: torch.dtype) -> ModelInput:
    """Inputs onto the device; floating-point inputs in the model's dtype (bf16 under DeepSpeed bf16)."""
    if isinstance(inputs, TextBatch | TokenBatch):
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
    """Class ids [N] of the stacked views (labeled), or [N, 2] class and content ids (pairs, triplets).

    Class ids are synthesized from sample keys where the shards carry none. Content ids hash each item's data,
    so the same text or image in two tuples shares one: the objective never takes it as a negative of an
    anchor it equals or is a positive of — e.g. pairs (q1, d1) and (q2, d1): neither copy of d1 is a negative
    of q1 or q2, on whichever workers they land.
    """
    if kind == "labeled":
        return class_ids(batch, kind)
    given = batch.get("content")  # hashed from the member bytes by the stream; else from the decoded inputs
    content = torch.cat([given[view] if given else content_ids(batch["views"][view]) for view in KIND_VIEWS[kind]])
    return torch.stack([class_ids(batch, kind), content], dim=1)


def class_ids(batch: dict, kind: str) -> torch.Tensor:
    """Class ids of the stacked views; for tuples without them, one id per tuple (positives share it)."""
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


def content_ids(inputs: ModelInput) -> torch.Tensor:
    """One id per item from its decoded data (text n-gram ids, array or pixel values): equal data, equal id."""
    if isinstance(inputs, TextBatch):
        rows = [inputs.rows(i, i + 1).ids for i in range(len(inputs))]
    elif isinstance(inputs, TokenBatch):
        rows = [inputs.rows(i, i + 1).input_ids for i in range(len(inputs))]
    else:
        rows = list(inputs.detach().cpu().reshape(len(inputs), -1))
    return torch.tensor([digest_id(row.contiguous().numpy().tobytes()) for row in rows], dtype=torch.long)


def digest_id(data: bytes) -> int:
    """A stable non-negative 63-bit id of `data`."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def key_id(key: str) -> int:
    """A stable, even, non-negative 62-bit id for a sample key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 2) << 1
