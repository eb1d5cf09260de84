"""Encoders: plain-torch trunks that map one modality to a flat feature vector.

Each encoder exposes `out_dim`, the width of its output, so a tower can put a projection head on top without
knowing what is underneath. No encoder sees ranks or devices beyond its inputs: distribution is applied from
outside (DeepSpeed wraps the whole model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.formats import TextBatch

# Pooling stops once the feature map's shorter side is below this, so tiny images (8×8 digits) still keep a
# 2×2 map for the last stage instead of being pooled down to a single pixel early.
MIN_POOLED_SIDE = 2
MAX_NORM_GROUPS = 8


class Encoder(nn.Module):
    """Base of all encoders: a module whose output is (batch, out_dim)."""

    out_dim: int
    """Width of the feature vector this encoder returns."""


class MLPEncoder(Encoder):
    """Flatten, then Linear → LayerNorm → GELU per hidden width (dropout between hidden layers)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for index, hidden in enumerate(hidden_dims):
            if index > 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, ...) float features → (B, out_dim)."""
        return self.layers(inputs)


def _norm_groups(channels: int) -> int:
    """Largest group count ≤ MAX_NORM_GROUPS that divides `channels`."""
    return next(g for g in range(min(MAX_NORM_GROUPS, channels), 0, -1) if channels % g == 0)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: an item's embedding must not depend on which other items share its batch, or
    # the global-batch loss (gathered across workers) would differ from one process on the whole batch, and
    # per-rank running statistics would diverge without a SyncBatchNorm collective inside the model.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(_norm_groups(out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class CNNEncoder(Encoder):
    """A small CNN for images of any size: per stage two 3×3 conv-norm-ReLU and a 2×2 max-pool, then a
    global average pool. A stage skips its pool when the map is already too small to halve."""

    def __init__(self, in_channels: int, channels: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        stages = []
        width = in_channels
        for out_channels in channels:
            stages.append(nn.Sequential(_conv_block(width, out_channels), _conv_block(out_channels, out_channels)))
            width = out_channels
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images → (B, out_dim)."""
        features = images
        for index, stage in enumerate(self.stages):
            if index > 0:
                features = self.dropout(features)
            features = stage(features)
            if min(features.shape[-2:]) >= 2 * MIN_POOLED_SIDE:
                features = F.max_pool2d(features, kernel_size=2)
        return features.mean(dim=(-2, -1))


class TextEncoder(Encoder):
    """Mean of hashed character n-gram embeddings (an `nn.EmbeddingBag`), then LayerNorm."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, batch: TextBatch) -> torch.Tensor:
        """A TextBatch of B texts → (B, out_dim)."""
        return self.norm(self.bag(batch.ids, batch.offsets))
