"""Towers and the embedding model: Siamese (one shared tower) or pseudo-Siamese (two towers, separate weights).

A tower is encoder → dropout → linear projection → L2 normalisation, so every embedding has unit length and
cosine similarity is an inner product. `build_model` checks that each encoder fits the modality of the views it
will read and raises `ConfigError` naming the key to change. Seeding is the caller's business:
`torch.manual_seed(seed)` before `build_model` gives the same weights on every worker.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import DataConfig, ModelConfig
from trainer.data.formats import IMAGE_EXTS, KIND_VIEWS, ShardIndex, TextBatch, ViewSpec
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

    def __init__(self, encoder: Encoder, embedding_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        # No head (embedding_dim None): the encoder's own features, normalised (a pretrained model as it is).
        self.head: nn.Module = nn.Linear(encoder.out_dim, embedding_dim) if embedding_dim is not None else nn.Identity()

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
        return freeze(EmbeddingModel(_build_tower(cfg, cfg.encoder, spec_a, "model.encoder", "the shards hold")),
                      cfg.freeze)
    spec_b = spec_a if spec_b is None else spec_b
    tower_a = _build_tower(cfg, cfg.encoder, spec_a, "model.encoder", "side a of the shards holds")
    # Tower B's kind defaults to model.encoder, but model.encoder_b is the key that changes only side b.
    tower_b = _build_tower(cfg, cfg.encoder_b or cfg.encoder, spec_b, "model.encoder_b", "side b of the shards holds",
                           side="b")
    return freeze(EmbeddingModel(tower_a, tower_b), cfg.freeze)


def _build_tower(cfg: ModelConfig, kind: str, spec: InputSpec, key: str, where: str, side: str = "a") -> Tower:
    if kind == "hf":
        _check_hf_modality(cfg, spec, side, where)
    _check_modality(kind, spec, key, where)
    return Tower(build_encoder(cfg, kind, spec, side), cfg.embedding_dim, cfg.dropout)


def freeze(model: EmbeddingModel, patterns: tuple[str, ...]) -> EmbeddingModel:
    """Parameters whose names match any fnmatch pattern (model.freeze) stop training (requires_grad False)."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"model.freeze: {pattern!r} matches no parameter; names look like {names[0]!r} "
                              f"(patterns are fnmatch, e.g. tower_a.encoder.*)")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
    return model


def _check_hf_modality(cfg: ModelConfig, spec: InputSpec, side: str, where: str) -> None:
    from trainer.models.hf import hf_modality, tower_source

    source, key = tower_source(cfg, side)
    modality = hf_modality(source, key)
    if modality != spec.modality:
        raise ConfigError(f"{key}: {source} reads {modality} inputs but {where} {_describe(spec)} views")


def build_encoder(cfg: ModelConfig, kind: str, spec: InputSpec, side: str = "a") -> Encoder:
    """The encoder `kind` (mlp, cnn or text) sized for `spec`, with widths from `cfg`."""
    if kind == "mlp":
        return MLPEncoder(math.prod(spec.shape), cfg.hidden_dims, cfg.dropout)
    if kind == "cnn":
        return CNNEncoder(spec.shape[0], cfg.channels, cfg.dropout)
    if kind == "text":
        return TextEncoder(spec.text_buckets, cfg.text_dim)
    if kind == "hf":  # the pretrained model of `side` (model.pretrained / pretrained_b)
        from trainer.models.hf import build_hf_encoder

        return build_hf_encoder(cfg, side)
    if kind == "module":
        from trainer.models.module import ModuleEncoder  # late: imports the user's module

        return ModuleEncoder.from_config(cfg, spec)
    raise ConfigError(f"model.encoder: unknown encoder {kind!r}; expected one of {sorted(ENCODER_MODALITY)}")


def build_preprocessors(cfg: ModelConfig, data: DataConfig, index: ShardIndex) -> dict[str, Preprocessor]:
    """Per view of `index`: the preprocessing the tower reading that view needs (see trainer/data/preprocess.py)."""
    return {view: view_preprocessor(cfg, data, index.views[view], view) for view in KIND_VIEWS[index.kind]}


# Views read by tower B of a pseudo-Siamese model (trainer/engine/step.py's TOWER_SIDE).
SIDE_B_VIEWS = ("b", "positive", "negative")


def view_encoder(cfg: ModelConfig, view: str) -> str:
    """The encoder kind of the tower that reads `view`."""
    if cfg.architecture == "pseudo_siamese" and view in SIDE_B_VIEWS:
        return cfg.encoder_b or cfg.encoder
    return cfg.encoder


def view_preprocessor(cfg: ModelConfig, data: DataConfig, spec: ViewSpec, view: str) -> Preprocessor:
    """The preprocessing of one view: images through `ImagePreprocessor` when the tower resizes them, texts of an
    hf tower through its tokenizer."""
    if spec.ext == "txt" and view_encoder(cfg, view) == "hf":
        return hf_text_preprocessor(cfg, view)
    if spec.ext in IMAGE_EXTS:
        image = image_preprocessor(cfg, data, spec, view)
        if image is not None:
            return image
    try:
        return default_preprocessor(spec, data)
    except ValueError:  # images of any size read by a tower that cannot resize them
        kind = view_encoder(cfg, view)
        key = "model.encoder_b" if kind != cfg.encoder else "model.encoder"
        raise ConfigError(f"{key}: {kind} needs {ENCODER_MODALITY.get(kind, kind)} inputs but the shards hold "
                          f"images of any size in view {view}; use {key}=cnn (with data.image.size), hf or module"
                          ) from None


def hf_text_preprocessor(cfg: ModelConfig, view: str) -> Preprocessor:
    """The tokenizer (and the side's prompt) of the hf text tower reading `view`."""
    from trainer.data.tokenize import TokenizerPreprocessor
    from trainer.models.hf import tower_source

    side = "b" if view in SIDE_B_VIEWS else "a"
    return TokenizerPreprocessor(tower_source(cfg, side)[0], cfg.max_length, cfg.prompts.get(side, ""))


def image_preprocessor(cfg: ModelConfig, data: DataConfig, spec: ViewSpec, view: str) -> Preprocessor | None:
    """`ImagePreprocessor` for an image view read by a cnn, module or hf tower (None: the fixed-size pixel path).

    Size, mean and std: data.image's when set, else the pretrained processor's (hf), else ImageNet's mean/std;
    hf and module towers read RGB, the cnn the shards' channels."""
    from trainer.data.transforms import ImagePreprocessor

    kind, settings = view_encoder(cfg, view), data.image
    size, mean, std = settings.size, settings.mean, settings.std
    channels = spec.shape[0] if spec.shape else 3
    if kind == "hf":
        from trainer.models.vision import image_settings

        side_b = cfg.architecture == "pseudo_siamese" and view in SIDE_B_VIEWS
        pretrained = (cfg.pretrained_b or cfg.pretrained) if side_b else cfg.pretrained
        if pretrained is None:
            raise ConfigError("model.pretrained: an hf tower needs a pretrained model directory or hub id")
        hf_size, hf_mean, hf_std = image_settings(pretrained)
        size, mean, std, channels = size or hf_size, mean or hf_mean, std or hf_std, 3
    elif kind == "module":
        channels = 3
    elif kind != "cnn" or (size is None and spec.shape is not None and len(spec.shape) == 3):
        return None
    if size is None:
        raise ConfigError(f"data.image.size: view {view} holds images of any size, and a {kind} tower needs them "
                          f"resized to one square size; set data.image.size (e.g. 64 or 224)")
    try:
        return ImagePreprocessor(size, channels=channels, resize=settings.resize, crop_scale=settings.crop_scale,
                                 crop_ratio=settings.crop_ratio, flip=settings.flip,
                                 color_jitter=settings.color_jitter, mean=mean, std=std, view=view)
    except ValueError as error:
        raise ConfigError(f"data.image: {error}") from None


def _check_modality(kind: str, spec: InputSpec, key: str, where: str) -> None:
    needed = ENCODER_MODALITY.get(kind)
    if needed is not None and needed != spec.modality:
        raise ConfigError(f"{key}: {kind} needs {needed} inputs but {where} {_describe(spec)} views; "
                          f"use {key}={MODALITY_ENCODER[spec.modality]}")


def _describe(spec: InputSpec) -> str:
    return f"{spec.modality} ({MODALITY_FILES[spec.modality]})"
