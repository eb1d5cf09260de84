"""Pretrained Hugging Face vision towers (`model.encoder: hf` with a vision model in `model.pretrained`): ViT,
DINOv2, ConvNeXt, ResNet, CLIP / SigLIP vision models, and whatever else `AutoModel` loads with pixel inputs.

`HFVisionEncoder` maps normalised pixels [B, 3, H, W] to pooled features [B, out_dim]: the model's pooler output
where it has a trained one (DINOv2's and CLIP's layer-normed CLS, SigLIP's attention pool, ConvNeXt's and ResNet's
global average), else the CLS token (ViT, loaded without its pooler, which is untrained in most checkpoints),
else the mean of the last feature map. A full CLIP or SigLIP checkpoint contributes its vision tower only.

`image_settings` reads the size and mean/std of the model's image processor from its JSON config
(preprocessor_config.json); the processor itself never runs — `trainer.data.transforms.ImagePreprocessor` does
that work in the loader. transformers is imported inside the functions (heavy; only hf towers need it).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.models.encoders import Encoder

PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_SIZE = 224
# Full two-tower checkpoints whose vision half is loaded on its own.
VISION_HALVES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
# Models whose pooler is an untrained head in most checkpoints: loaded without it, the CLS token is used.
NO_POOLER: dict[str, dict[str, Any]] = {"vit": {"add_pooling_layer": False}, "deit": {"add_pooling_layer": False}}


class HFVisionEncoder(Encoder):
    """A pretrained vision backbone → pooled features [B, out_dim]."""

    def __init__(self, pretrained: str, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = load_vision_model(pretrained)
        self.source = pretrained
        config = self.model.config
        sizes = getattr(config, "hidden_sizes", None)
        self.out_dim = int(sizes[-1]) if sizes else int(config.hidden_size)
        self.image_size = getattr(config, "image_size", None)
        self.interpolate = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        if gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"model.gradient_checkpointing: {type(self.model).__name__} does not support it")
            # transformers 5 renamed it (the old name warns that it goes away in v6).
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable
            enable()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, C, H, W] → (B, out_dim)."""
        extra = {}
        if self.interpolate and isinstance(self.image_size, int) and pixels.shape[-1] != self.image_size:
            extra["interpolate_pos_encoding"] = True  # position embeddings resized for another input size
        outputs = self.model(pixel_values=pixels, **extra)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = outputs.last_hidden_state
        return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(-2, -1))


def load_vision_model(pretrained: str) -> Any:
    """The vision model of `pretrained` (a directory or hub id); ConfigError when it is not a vision model."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(pretrained)
        model_type = getattr(config, "model_type", "")
        if model_type in VISION_HALVES:
            model = getattr(transformers, VISION_HALVES[model_type]).from_pretrained(pretrained)
        else:
            model = transformers.AutoModel.from_pretrained(pretrained, **NO_POOLER.get(model_type, {}))
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"model.pretrained: {pretrained}: cannot load a vision model ({_first_line(error)})") \
            from None
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise ConfigError(f"model.pretrained: {pretrained}: {type(model).__name__} is not a vision model (it reads "
                          f"{getattr(model, 'main_input_name', '?')}, not pixel_values)")
    return model


def is_vision_model(pretrained: str) -> bool:
    """Whether `pretrained` is a vision model (its image processor config or its model type says so)."""
    if _processor_config(pretrained) is not None:
        return True
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError, KeyError):
        return False
    return getattr(config, "model_type", "") in VISION_HALVES or hasattr(config, "num_channels")


def image_settings(pretrained: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(size, mean, std) of `pretrained`'s image processor, from its JSON config: the centre-crop size when the
    processor crops, else its resize size; without a processor config, the model config's image_size (else 224)
    and ImageNet's mean/std."""
    from trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    raw = _processor_config(pretrained)
    if raw is None:
        return _model_image_size(pretrained), IMAGENET_MEAN, IMAGENET_STD
    size = _size(raw.get("crop_size") if raw.get("do_center_crop") else None) or _size(raw.get("size")) \
        or _model_image_size(pretrained)
    if raw.get("do_normalize", True) is False:
        return size, (0.0,), (1.0,)
    mean = tuple(float(v) for v in _triple(raw.get("image_mean", IMAGENET_MEAN)))
    std = tuple(float(v) for v in _triple(raw.get("image_std", IMAGENET_STD)))
    return size, mean, std


def _processor_config(pretrained: str) -> dict[str, Any] | None:
    local = Path(pretrained)
    if local.is_dir():
        path: Path | None = local / PROCESSOR_FILE if (local / PROCESSOR_FILE).is_file() else None
    else:
        from transformers.utils import cached_file  # a hub id: the cache, or the hub unless HF_HUB_OFFLINE

        try:
            found = cached_file(pretrained, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
        except OSError as error:
            raise ConfigError(f"model.pretrained: {pretrained}: not a local directory, and the hub cannot give "
                              f"it ({_first_line(error)})") from None
        path = Path(found) if found else None
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model.pretrained: {path}: not a readable image processor config ({error})") from None
    return raw if isinstance(raw, dict) else None


def _size(raw: Any) -> int | None:
    if isinstance(raw, int):
        return raw
    if isinstance(raw, dict):
        for key in ("shortest_edge", "height", "width"):
            if isinstance(raw.get(key), int):
                return int(raw[key])
    return None


def _triple(values: Any) -> tuple[float, ...]:
    return tuple(values) if isinstance(values, (list, tuple)) else (float(values),)


def _model_image_size(pretrained: str) -> int:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError, KeyError):
        return DEFAULT_SIZE
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    return int(size) if isinstance(size, int) else DEFAULT_SIZE


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
