"""Pretrained Hugging Face towers (`model.encoder: hf`): a backbone from a local directory or a hub id.

`hf_modality` decides what a pretrained model reads (text, or images for vision backbones) from its config;
`HFTextEncoder` wraps `AutoModel` with a pooling of its token states (mean, first/[CLS], last real token, or the
model's own pooler), optional gradient checkpointing and optional LoRA adapters (peft, merged on export). Its
tokenizer runs in the data loader (`trainer.data.tokenize.TokenizerPreprocessor`), not here.

transformers and peft are imported inside functions: `twinscale --help` and the toy encoders never pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from trainer.config import LoraConfig, ModelConfig
from trainer.data.formats import TokenBatch
from trainer.errors import ConfigError
from trainer.models.encoders import Encoder

Pooling = Literal["mean", "cls", "last", "pooler"]
# model_type values of vision backbones (and what a vision config nests), read from config.json.
VISION_MODEL_TYPES = {"vit", "dinov2", "dinov2_with_registers", "convnext", "convnextv2", "resnet", "clip_vision_model",
                      "siglip_vision_model", "siglip2_vision_model", "swin", "swinv2", "deit", "beit", "efficientnet",
                      "mobilevit", "mobilenet_v2", "regnet", "levit", "dit", "hiera", "pvt", "segformer"}
VIEW_SIDE = {"input": "a", "a": "a", "anchor": "a", "b": "b", "positive": "b", "negative": "b"}


def tower_source(cfg: ModelConfig, side: str) -> tuple[str, str]:
    """The pretrained model of the hf tower of `side` and the config key that names it."""
    if side == "b" and cfg.pretrained_b is not None:
        return cfg.pretrained_b, "model.pretrained_b"
    if cfg.pretrained is None:
        raise ConfigError(f"model.pretrained{'_b' if side == 'b' else ''}: the hf tower of side {side} needs a "
                          "model directory or hub id")
    return cfg.pretrained, "model.pretrained"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_pretrained_config(source: str, key: str) -> Any:
    """The `PretrainedConfig` of a local directory or hub id; ConfigError naming `key` when it cannot be read."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {source} is not a Hugging Face model directory (no config.json); point it "
                              "at a directory written by save_pretrained")
        source = str(path)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(f"{key}: {source}: no such model directory")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - hub, network and parsing errors all mean "cannot use this model"
        offline = " (HF_HUB_OFFLINE is set: only models already in the local cache load)" \
            if _hub_offline() else " (no network? set HF_HUB_OFFLINE=1 to use the local cache only)"
        raise ConfigError(f"{key}: cannot load {source!r} as a local model directory or hub id{offline}: "
                          f"{_first_line(error)}") from None


def _hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hf_modality(source: str, key: str) -> Literal["text", "image"]:
    """Whether the pretrained model reads text (has a tokenizer) or images (a vision model type)."""
    config = load_pretrained_config(source, key)
    model_type = str(getattr(config, "model_type", ""))
    vision = model_type in VISION_MODEL_TYPES or (hasattr(config, "vision_config")
                                                  and not hasattr(config, "text_config"))
    if not vision:
        try:
            from trainer.models.vision import is_vision_model
        except ImportError:
            return "text"
        vision = is_vision_model(source)
    return "image" if vision else "text"


def build_hf_encoder(cfg: ModelConfig, side: str) -> Encoder:
    """The hf encoder of `side`: text towers here, vision towers from trainer/models/vision.py."""
    source, key = tower_source(cfg, side)
    if hf_modality(source, key) == "image":
        try:
            from trainer.models.vision import HFVisionEncoder
        except ImportError:
            raise ConfigError(f"{key}: {source} is a vision model; this installation has no vision towers "
                              "(trainer/models/vision.py)") from None
        return HFVisionEncoder(source, cfg.gradient_checkpointing)
    return HFTextEncoder(source, cfg.pooling, key=key, gradient_checkpointing=cfg.gradient_checkpointing,
                         lora=cfg.lora)


class HFTextEncoder(Encoder):
    """A pretrained transformer (`AutoModel`) and a pooling of its last hidden states: TokenBatch → (B, hidden)."""

    def __init__(self, source: str, pooling: Pooling = "mean", *, key: str = "model.pretrained",
                 gradient_checkpointing: bool = False, lora: LoraConfig | None = None) -> None:
        super().__init__()
        load_pretrained_config(source, key)  # a clear error before transformers' own
        import transformers
        from transformers import AutoModel

        transformers.utils.logging.disable_progress_bar()
        try:
            backbone = AutoModel.from_pretrained(source, dtype=torch.float32)
        except Exception as error:  # noqa: BLE001 - missing or corrupt weights, unknown architecture
            raise ConfigError(f"{key}: cannot load the model in {source}: {_first_line(error)}") from None
        self.source, self.pooling = source, pooling
        self.out_dim = int(backbone.config.hidden_size)
        pooler = getattr(backbone, "pooler", None)
        if pooling == "pooler" and pooler is None:
            raise ConfigError(f"model.pooling: {source} has no pooler layer; use mean, cls or last")
        if pooling != "pooler" and pooler is not None:
            pooler.requires_grad_(False)  # unused: kept as loaded, out of the optimizer
        if gradient_checkpointing:  # transformers 5 renamed it (the old name warns that it goes away in v6)
            if hasattr(backbone, "activation_checkpointing_enable"):
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.backbone = _with_lora(backbone, lora) if lora is not None else backbone

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """A TokenBatch of B right-padded texts → (B, out_dim) pooled features."""
        outputs = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        if self.pooling == "pooler":
            return outputs.pooler_output
        return pool_tokens(outputs.last_hidden_state, batch.attention_mask, self.pooling)

    def merged_backbone(self) -> Any:
        """The backbone as a plain transformers model: LoRA adapters merged into the base weights."""
        from peft import PeftModel

        if isinstance(self.backbone, PeftModel):
            return self.backbone.merge_and_unload()
        return self.backbone


def pool_tokens(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) token states and their (B, L) attention mask → (B, H): mean of real tokens, first or last real."""
    if pooling == "cls":
        return states[:, 0]
    if pooling == "last":  # right padding: the last real token is at length - 1
        last = mask.sum(dim=1).clamp(min=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _with_lora(backbone: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules) if lora.target_modules is not None else None
    try:
        return get_peft_model(backbone, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                       target_modules=targets))
    except ValueError as error:
        raise ConfigError(f"model.lora.target_modules: {_first_line(error)}") from None
