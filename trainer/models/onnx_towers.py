"""Each tower of an exported model as a graph over plain tensors, ready for `torch.onnx.export`.

A tower's torch input may be a `TextBatch` (ids + offsets of an `nn.EmbeddingBag`) or a `TokenBatch`; ONNX and its
serving systems want named tensors with fixed dtypes. `tower_graph` wraps a tower in a module whose inputs are:

| tower | inputs (name: dtype [shape]) |
|---|---|
| mlp (vectors), module on vectors | `inputs`: float32 [batch, *shape] |
| cnn, hf vision, module (images) | `pixel_values`: float32 [batch, C, H, W], normalised as `preprocessing` says |
| hashed text (n-gram bag) | `ngram_ids`, `ngram_mask`: int64 [batch, ngrams] (mask 1 on real n-grams, 0 on padding) |
| hf text | `input_ids`: int64 [batch, sequence], `attention_mask`: int64 [batch, sequence] |

The hashed-text graph replaces the EmbeddingBag's ragged ids + offsets by a right-padded id matrix and its mask: the
masked mean of the embedding rows equals the bag's mean (an empty row gives zeros, as an empty bag does). hf text
towers take no `token_type_ids`: the torch tower never passes them (the backbone uses its zeros default), so the
graph computes exactly what training did. Every graph ends with the projection head and the L2 normalisation:
its output `normalized_embedding` [batch, dim] equals `model(batch, side)`.

`graph_feeds` turns a collated torch batch into these inputs (numpy), for tests, benchmarks and onnxruntime users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.formats import TextBatch, TokenBatch
from trainer.errors import CheckpointError
from trainer.models.encoders import CNNEncoder, MLPEncoder, TextEncoder
from trainer.models.towers import InputSpec, Tower

OUTPUT_NAME = "normalized_embedding"  # not "embedding": the exporter names aten.embedding values so
BATCH, SEQUENCE, NGRAMS = "batch", "sequence", "ngrams"
DUMMY_BATCH = 2  # not 1: the exporter would specialise a size-1 batch axis to a constant
DUMMY_TOKENS = 8


@dataclass(frozen=True)
class GraphInput:
    """One named input of a tower graph: dtype and shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form for onnx_config.json."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class TowerGraph:
    """A tower wrapped for export: its module, input descriptions and the dummy inputs it is traced with."""

    kind: str
    """mlp, cnn, hashed_text, hf_text, hf_vision or module."""
    module: nn.Module
    inputs: tuple[GraphInput, ...]
    dummy: tuple[torch.Tensor, ...]
    out_dim: int


class TensorTower(nn.Module):
    """A tower that already reads one tensor (vectors or images)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.tower(inputs)


class TokenTower(nn.Module):
    """An hf text tower over (input_ids, attention_mask)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(TokenBatch(input_ids, attention_mask))


class HashedTextTower(nn.Module):
    """The n-gram bag tower over a padded id matrix: masked mean of embedding rows, LayerNorm, head, L2 norm."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, ngram_ids: torch.Tensor, ngram_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.tower.encoder
        assert isinstance(encoder, TextEncoder)
        rows = F.embedding(ngram_ids, encoder.bag.weight)  # [B, L, D]
        weights = ngram_mask.to(rows.dtype).unsqueeze(-1)
        mean = (rows * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        features = encoder.norm(mean)
        return F.normalize(self.tower.head(self.tower.dropout(features)), p=2, dim=-1)


def tower_kind(tower: Tower) -> str:
    """What kind of encoder a tower holds (see the module docstring's table)."""
    encoder = tower.encoder
    if isinstance(encoder, MLPEncoder):
        return "mlp"
    if isinstance(encoder, CNNEncoder):
        return "cnn"
    if isinstance(encoder, TextEncoder):
        return "hashed_text"
    name = type(encoder).__name__
    kinds = {"HFTextEncoder": "hf_text", "HFVisionEncoder": "hf_vision", "ModuleEncoder": "module"}
    if name not in kinds:
        raise CheckpointError(f"cannot export a tower with encoder {name} to ONNX (supported: mlp, cnn, text, "
                              "hf text and vision, module)")
    return kinds[name]


def tower_graph(tower: Tower, spec: InputSpec, image_size: int | None) -> TowerGraph:
    """The tower as an exportable graph for inputs `spec` (`image_size`: the preprocessing's square crop, if any)."""
    kind = tower_kind(tower)
    out_dim = int(tower.head.out_features) if isinstance(tower.head, nn.Linear) else int(tower.encoder.out_dim)
    if kind == "hf_text":
        vocab = int(tower.encoder.backbone.config.vocab_size)  # type: ignore[union-attr, arg-type]
        ids, mask = _dummy_tokens(vocab)
        inputs = (GraphInput("input_ids", "int64", (BATCH, SEQUENCE)),
                  GraphInput("attention_mask", "int64", (BATCH, SEQUENCE)))
        return TowerGraph(kind, TokenTower(tower).eval(), inputs, (ids, mask), out_dim)
    if kind == "hashed_text":
        ids, mask = _dummy_tokens(spec.text_buckets)
        inputs = (GraphInput("ngram_ids", "int64", (BATCH, NGRAMS)), GraphInput("ngram_mask", "int64", (BATCH, NGRAMS)))
        return TowerGraph(kind, HashedTextTower(tower).eval(), inputs, (ids, mask), out_dim)
    if spec.modality == "text":
        raise CheckpointError(f"cannot export a {kind} tower reading text to ONNX (only hf and text encoders "
                              "read text)")
    shape = _item_shape(spec, image_size)
    name = "pixel_values" if spec.modality == "image" else "inputs"
    dummy = torch.randn(DUMMY_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    return TowerGraph(kind, TensorTower(tower).eval(), (GraphInput(name, "float32", (BATCH, *shape)),), (dummy,),
                      out_dim)


def _item_shape(spec: InputSpec, image_size: int | None) -> tuple[int, ...]:
    if spec.modality == "image" and image_size is not None:
        return (spec.shape[0] if spec.shape else 3, image_size, image_size)
    return tuple(spec.shape)


def _dummy_tokens(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ids, the second right-padded: the trace sees a real mask, not an all-ones constant."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 1), (DUMMY_BATCH, DUMMY_TOKENS), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, DUMMY_TOKENS // 2:] = 0
    return ids * mask, mask


def pad_text_batch(batch: TextBatch) -> tuple[np.ndarray, np.ndarray]:
    """A TextBatch (ids + offsets) → right-padded `ngram_ids` and `ngram_mask` [B, longest] (int64)."""
    ids, offsets = batch.ids.numpy(), batch.offsets.numpy()
    ends = np.append(offsets[1:], len(ids))
    lengths = ends - offsets
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    matrix = np.zeros((len(offsets), width), dtype=np.int64)
    mask = np.zeros((len(offsets), width), dtype=np.int64)
    for row, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        matrix[row, :length] = ids[start:start + length]
        mask[row, :length] = 1
    return matrix, mask


def graph_feeds(graph_inputs: list[dict[str, Any]], batch: torch.Tensor | TextBatch | TokenBatch
                ) -> dict[str, np.ndarray]:
    """A collated torch batch → onnxruntime feeds for a tower whose inputs onnx_config.json lists."""
    names = [str(entry["name"]) for entry in graph_inputs]
    if isinstance(batch, TextBatch):
        return dict(zip(names, pad_text_batch(batch), strict=True))
    if isinstance(batch, TokenBatch):
        return {names[0]: batch.input_ids.numpy().astype(np.int64),
                names[1]: batch.attention_mask.numpy().astype(np.int64)}
    return {names[0]: batch.detach().numpy().astype(np.float32)}
