"""What a run needs before its first step, computed from the config and the shard indexes alone.

The driver calls `plan_run` before starting any worker, so a config that cannot work with the shards (an
encoder for the wrong modality, too few shards for the workers) fails at once with exit code 2; each worker
calls it again to build its model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import Config
from trainer.data.formats import KIND_VIEWS, ShardIndex
from trainer.data.preprocess import Preprocessor
from trainer.data.shardsets import open_data
from trainer.data.stream import plan_epoch
from trainer.errors import ConfigError
from trainer.models.params import param_groups
from trainer.models.towers import EmbeddingModel, InputSpec, build_model, build_preprocessors


@dataclass
class RunPlan:
    """Shapes and lengths of a run."""

    kind: str
    spec_a: InputSpec
    spec_b: InputSpec | None
    total_steps: int
    steps_per_epoch: int
    preprocessors: dict[str, Preprocessor]
    """Per view: how the stream turns its members into model inputs (the model's choice; see preprocess.py)."""


def input_spec(index: ShardIndex, view: str, text_buckets: int,
               preprocessor: Preprocessor | None = None) -> InputSpec:
    """The model input of one shard view (an image view resized by its preprocessor: [C, size, size])."""
    fmt = index.views[view]
    output_shape = getattr(preprocessor, "output_shape", None)
    if output_shape is not None:
        return InputSpec("image", tuple(output_shape))
    if fmt.ext == "txt":
        return InputSpec("text", (), text_buckets=text_buckets)
    if fmt.ext == "npy":
        return InputSpec("vector", tuple(fmt.shape or ()))
    return InputSpec("image", tuple(fmt.shape or ()))


def plan_run(cfg: Config, world_size: int | None = None, check_model: bool = True) -> RunPlan:
    """Validate the config against the shards and compute the run's length.

    `check_model` builds the model once to validate it (the driver); a worker, which builds it next anyway, passes
    False so that pretrained weights are not loaded twice."""
    world = world_size or cfg.dist.workers
    index = open_data(cfg.data.train, cfg.data, train=True)
    views = KIND_VIEWS[index.kind]
    if index.kind == "labeled" and cfg.model.architecture == "pseudo_siamese":
        raise ConfigError("model.architecture: pseudo_siamese needs pair or triplet shards (two kinds of input); "
                          f"{cfg.data.train} holds labeled items — use model.architecture=siamese")
    if cfg.loss.name == "clip" and index.kind != "pairs":
        raise ConfigError(f"loss.name: clip needs pair shards (a, b); {cfg.data.train} holds {index.kind} shards — "
                          "use pair shards or another loss.name")
    preprocessors = build_preprocessors(cfg.model, cfg.data, index)
    spec_a = input_spec(index, views[0], cfg.data.text_buckets, preprocessors[views[0]])
    spec_b = input_spec(index, views[1], cfg.data.text_buckets, preprocessors[views[1]]) if len(views) > 1 else None
    if cfg.data.test is not None:
        test = open_data(cfg.data.test, cfg.data)
        if test.kind != index.kind:
            raise ConfigError(f"data.test: {cfg.data.test} holds {test.kind} shards but data.train holds {index.kind}")
    per_epoch = [plan_epoch(index, seed=cfg.seed, epoch=e, world_size=world,
                            loader_workers=cfg.data.workers_for(len(index.shards), world),
                            batch_size=cfg.data.batch_size, epoch_samples=cfg.data.epoch_samples).batches_per_rank
                 for e in range(cfg.optim.epochs)]
    total = sum(per_epoch)
    if cfg.optim.max_steps is not None:
        total = min(total, cfg.optim.max_steps)
    if check_model:
        # Raises ConfigError for an encoder/modality mismatch, a pretrained model that cannot load, or a
        # model.freeze / optim.lr_groups pattern that matches no parameter.
        param_groups(build_model(cfg.model, spec_a, spec_b), cfg.optim.lr, cfg.optim.lr_groups)
    return RunPlan(index.kind, spec_a, spec_b, total, per_epoch[0], preprocessors)


def build_run_model(cfg: Config, plan: RunPlan) -> EmbeddingModel:
    """The model of a run, initialised from the run's seed (identical on every worker)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, plan.spec_a, plan.spec_b)
    if cfg.loss.name == "clip":
        model.add_logit_scale(math.log(1.0 / cfg.loss.clip_temperature))
    return model
