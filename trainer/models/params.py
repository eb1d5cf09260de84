"""Optimizer parameter groups: trainable parameters only, with a learning rate per name pattern (optim.lr_groups).

Like sentence-transformers' `learning_rate_mapping`: each trainable parameter takes the learning rate of the first
fnmatch pattern its name matches, the rest `optim.lr`; frozen parameters (model.freeze, LoRA's base weights) are
left out; clip's `logit_scale` is exempt from weight decay. DeepSpeed's schedule scales every group's rate by the
same warm-up/decay factor.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from trainer.errors import ConfigError

NO_DECAY = ("logit_scale",)
"""Parameter names AdamW never decays."""


def param_groups(model: nn.Module, lr: float, lr_groups: dict[str, float]) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`'s trainable parameters; ConfigError for a pattern that matches none."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ConfigError("model.freeze: every parameter is frozen; nothing would train")
    patterns = list(lr_groups)
    members: dict[str | None, list[nn.Parameter]] = {pattern: [] for pattern in [None, *patterns]}
    for name, param in trainable:
        pattern = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        members[pattern].append(param)
    for pattern in patterns:
        if not members[pattern]:
            raise ConfigError(f"optim.lr_groups.{pattern}: matches no trainable parameter (names look like "
                              f"{trainable[0][0]!r}; earlier patterns take precedence)")
    rates = ([(members[None], lr)] if members[None] else []) + [(members[p], lr_groups[p]) for p in patterns]
    # clip's temperature is not a weight: decaying it would pull the learned logit_scale towards 0 (open_clip
    # exempts it too). It gets a group of its own at its pattern's rate, with weight decay 0.
    exempt = {id(param) for name, param in trainable if name in NO_DECAY}
    groups: list[dict[str, Any]] = []
    for params, rate in rates:
        kept = [p for p in params if id(p) not in exempt]
        freed = [p for p in params if id(p) in exempt]
        groups += ([{"params": kept, "lr": rate}] if kept else []) + \
            ([{"params": freed, "lr": rate, "weight_decay": 0.0}] if freed else [])
    return groups
