"""Small torch modules for `model.encoder: module` tests, imported by spec (`tests.module_helpers:tiny_trunk`)."""

from __future__ import annotations

import torch
from torch import nn


class TinyTrunk(nn.Module):
    """conv → ReLU → global average pool → linear: images [B, C, H, W] of any size → [B, width]."""

    def __init__(self, channels: int = 3, width: int = 8, declare_out_dim: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, kernel_size=3, padding=1)
        self.fc = nn.Linear(6, width)
        if declare_out_dim:
            self.out_dim = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(images)).mean(dim=(-2, -1)))


def tiny_trunk(channels: int = 3, width: int = 8, declare_out_dim: bool = True) -> nn.Module:
    """The factory a recipe names."""
    return TinyTrunk(channels, width, declare_out_dim)


def not_a_module() -> object:
    return object()


def spatial_features() -> nn.Module:
    """A module that forgets to pool: [B, 6, H, W] instead of [B, D]."""
    return nn.Conv2d(3, 6, kernel_size=3, padding=1)


class Payload:
    """Unpickling this would create the marker file: weights_only loading must refuse it first."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))
