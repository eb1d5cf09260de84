"""Preprocessing of one view: from a tar member's bytes to a model input, the same in training, evaluation,
`twinscale embed` and serving.

A `Preprocessor` is chosen per view by the model that reads it (`trainer.models.towers.build_preprocessors`): the
toy encoders keep today's decoding (npy arrays, images of the size index.json declares, hashed n-grams), while a
pretrained tower brings its own (a tokenizer, an image processor's size and mean/std). It runs in DataLoader
workers, so it must be picklable and cheap to copy; heavy state (a tokenizer) is loaded lazily per process.

Two steps, so that work per sample stays in the loader and work per batch happens once:
- `prepare(data, ext, context)`: one sample's member bytes → a plain row (numpy array, str, …). Raises any
  exception for undecodable bytes: the stream counts it as a corrupt sample.
- `collate(rows)`: the rows of a batch → the model input (a tensor, `TextBatch` or `TokenBatch`).

Randomness (train augmentation) must be a function of `context` only — (seed, epoch, sample key) — never of a
global RNG, the worker id or the number of workers, so exact resume stays bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.formats import TextBatch, TokenBatch

ModelInput = torch.Tensor | TextBatch | TokenBatch


@dataclass(frozen=True)
class SampleContext:
    """What a sample's preprocessing may depend on."""

    key: str
    """The sample's key in its shard (`__key__`)."""
    seed: int = 0
    """The run's seed."""
    epoch: int = 0
    """Training epoch (0 in evaluation)."""
    train: bool = False
    """Training (augment) or evaluation/inference (deterministic)."""


class Preprocessor:
    """Base of a view's preprocessing; see the module docstring for the contract."""

    def prepare(self, data: bytes, ext: str, context: SampleContext) -> Any:
        """One member's bytes → a row; raise on undecodable bytes."""
        raise NotImplementedError

    def collate(self, rows: list[Any]) -> ModelInput:
        """A batch of rows → the model input."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored with an exported model so inference preprocesses exactly as training."""
        raise NotImplementedError
