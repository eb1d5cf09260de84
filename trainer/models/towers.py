"""Towers and the embedding model: Siamese (one shared tower) or pseudo-Siamese (two towers, separate weights).

A tower is encoder → dropout → linear projection → L2 normalisation, so every embedding has unit length and
cosine similarity is an inner product. `build_model` checks that each encoder fits the modality of the views it
will read and raises `ConfigError` naming the key to change. Seeding is the caller's business:
`torch.manual_seed(seed)` before `build_model` gives the same weights on every worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import DataConfig, ModelConfig
from trainer.data.formats import KIND_VIEWS, ShardIndex, TextBatch
from trainer.data.preprocess import Preprocessor, default_preprocessor
from trainer.errors import ConfigError
from trainer.models.encoders import CNNEncoder, Encoder, MLPEncoder, TextEncoder

Modality = Literal["vector", "image", "text"]
ModelInput = torch.Tensor | TextBatch

# What each encoder reads, and how the user would recognise that modality in their shards.
ENCODER_MODALITY: dict[str, Modality] = {"mlp": "vector", "cnn": "image", "text": "text"}
MODALITY_ENCODER: dict[Modality, str] = {"vector": "mlp", "image": "cnn", "text": "text"}
MODALITY_FILES: dict[Modality, str] = {"vector": "npy", "image": "png/jpg", "text": "txt"}
SHAPE_RANK: dict[Modality, int] = {"vector": 1, "image": 3, "text": 0}


@dataclass(frozen=True)
class InputSpec:
    """What one side of the model reads: modality and per-item shape (vector (D,), image (C, H, W), text ())."""

    modality: Modality
    shape: tuple[int, ...]
    text_buckets: int = 0
    """Hash buckets of the text n-gram vocabulary (text only)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(side) for side in self.shape))
        if self.modality not in SHAPE_RANK:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {sorted(SHAPE_RANK)}")
        if len(self.shape) != SHAPE_RANK[self.modality] or any(side < 1 for side in self.shape):
            raise ValueError(f"{self.modality} inputs need a shape of {SHAPE_RANK[self.modality]} positive "
                             f"sizes, got {self.shape}")
        if self.modality == "text" and self.text_buckets < 1:
            raise ValueError("text inputs need text_buckets ≥ 1 (data.text_buckets)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (shape as a list)."""
        return {**asdict(self), "shape": list(self.shape)}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> InputSpec:
        """Inverse of `to_dict`."""
        return InputSpec(raw["modality"], tuple(raw["shape"]), int(raw.get("text_buckets", 0)))


class Tower(nn.Module):
    """encoder → dropout → linear projection → L2 normalisation (unit-length embeddings)."""

    def __init__(self, encoder: Encoder, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.out_dim, embedding_dim)

    def forward(self, inputs: ModelInput) -> torch.Tensor:
        """A batch of B inputs → (B, embedding_dim) unit vectors."""
        return F.normalize(self.head(self.dropout(self.encoder(inputs))), p=2, dim=-1)


class EmbeddingModel(nn.Module):
    """Tower A, plus tower B with its own weights for pseudo-Siamese models."""

    def __init__(self, tower_a: Tower, tower_b: Tower | None = None) -> None:
        super().__init__()
        self.tower_a = tower_a
        self.tower_b = tower_b
        self.logit_scale: nn.Parameter | None
        self.register_parameter("logit_scale", None)  # loss.name=clip's learnable temperature, see add_logit_scale

    def add_logit_scale(self, value: float) -> None:
        """Give the model CLIP's learnable logit_scale (log of the inverse temperature), trained, checkpointed and
        exported with the towers; embedding never uses it."""
        # Shape [1], not a scalar: DeepSpeed's parameter broadcast views every parameter as bytes (fails at 0-d).
        self.logit_scale = nn.Parameter(torch.tensor([float(value)]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # An exported clip model carries logit_scale; a model rebuilt from its config gets the parameter here.
        if self.logit_scale is None and prefix + "logit_scale" in state_dict:
            self.logit_scale = nn.Parameter(torch.zeros_like(state_dict[prefix + "logit_scale"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_siamese(self) -> bool:
        """True when both sides share one tower."""
        return self.tower_b is None

    def forward(self, inputs: ModelInput, side: str = "a") -> torch.Tensor:
        """Embed `inputs` with the tower of `side` ("b" falls back to the shared tower of a Siamese model)."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        tower = self.tower_b if side == "b" and self.tower_b is not None else self.tower_a
        return tower(inputs)


def build_model(cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None = None) -> EmbeddingModel:
    """Build the model `cfg` describes for inputs `spec_a` (and `spec_b` for side b; None means as side a)."""
    if cfg.architecture == "siamese":
        if spec_b is not None and spec_b != spec_a:
            raise ConfigError(f"model.architecture: a siamese model shares one tower, but side a holds "
                              f"{_describe(spec_a)} views of shape {spec_a.shape} and side b {_describe(spec_b)} "
                              f"views of shape {spec_b.shape}; "
                              "use model.architecture=pseudo_siamese")
        return EmbeddingModel(_build_tower(cfg, cfg.encoder, spec_a, "model.encoder", "the shards hold"))
    spec_b = spec_a if spec_b is None else spec_b
    tower_a = _build_tower(cfg, cfg.encoder, spec_a, "model.encoder", "side a of the shards holds")
    # Tower B's kind defaults to model.encoder, but model.encoder_b is the key that changes only side b.
    tower_b = _build_tower(cfg, cfg.encoder_b or cfg.encoder, spec_b, "model.encoder_b", "side b of the shards holds")
    return EmbeddingModel(tower_a, tower_b)


def _build_tower(cfg: ModelConfig, kind: str, spec: InputSpec, key: str, where: str) -> Tower:
    _check_modality(kind, spec, key, where)
    return Tower(build_encoder(cfg, kind, spec), cfg.embedding_dim, cfg.dropout)


def build_encoder(cfg: ModelConfig, kind: str, spec: InputSpec) -> Encoder:
    """The encoder `kind` (mlp, cnn or text) sized for `spec`, with widths from `cfg`."""
    if kind == "mlp":
        return MLPEncoder(math.prod(spec.shape), cfg.hidden_dims, cfg.dropout)
    if kind == "cnn":
        return CNNEncoder(spec.shape[0], cfg.channels, cfg.dropout)
    if kind == "text":
        return TextEncoder(spec.text_buckets, cfg.text_dim)
    raise ConfigError(f"model.encoder: unknown encoder {kind!r}; expected one of {sorted(ENCODER_MODALITY)}")


def build_preprocessors(cfg: ModelConfig, data: DataConfig, index: ShardIndex) -> dict[str, Preprocessor]:
    """Per view of `index`: the preprocessing the tower reading that view needs (see trainer/data/preprocess.py)."""
    return {view: default_preprocessor(index.views[view], data) for view in KIND_VIEWS[index.kind]}


def _check_modality(kind: str, spec: InputSpec, key: str, where: str) -> None:
    needed = ENCODER_MODALITY.get(kind)
    if needed is not None and needed != spec.modality:
        raise ConfigError(f"{key}: {kind} needs {needed} inputs but {where} {_describe(spec)} views; "
                          f"use {key}={MODALITY_ENCODER[spec.modality]}")


def _describe(spec: InputSpec) -> str:
    return f"{spec.modality} ({MODALITY_FILES[spec.modality]})"
