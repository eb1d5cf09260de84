"""The DeepSpeed engine of a worker: AdamW, warm-up + cosine schedule, clipping, ZeRO 0-2, bf16 on GPU.

DeepSpeed is imported here and only here (it takes seconds to import). On CPU it runs over gloo, reusing the
process group that Ray Train or torchrun set up. Checkpoints are loaded without unpickling arbitrary objects:
see `safe_checkpoint_engine`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from trainer.config import Config

# DeepSpeed picks its accelerator at import time; on a machine without CUDA say so explicitly, which also
# silences its "unable to detect" warning.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_device(cfg: Config) -> torch.device:
    """The device this worker trains on: its local GPU when there is one and the config allows it.

    Ray Train picks each worker's GPU itself (`torch.cuda.set_device` before the worker starts; with per-worker
    CUDA_VISIBLE_DEVICES a worker's GPU is cuda:0 whatever its local rank), so once a launcher has set up the
    process group and CUDA, its current device is the answer; under torchrun it is the local rank's GPU."""
    if cfg.dist.device == "cuda" or (cfg.dist.device == "auto" and torch.cuda.is_available()):
        import torch.distributed as dist

        if dist.is_initialized() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 weights/activations on GPU (or when asked for), fp32 on CPU."""
    return cfg.dist.precision == "bf16" or (cfg.dist.precision == "auto" and device.type == "cuda")


def deepspeed_config(cfg: Config, world_size: int, total_steps: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config generated from the run config, with `dist.deepspeed` merged over it."""
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # The feature cache replays micro-batches itself and owns the accumulation boundary (engine.step()).
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": not cfg.optim.feature_cache,
        "train_batch_size": cfg.data.batch_size * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "bf16": {"enabled": uses_bf16(cfg, device)},
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, cfg.optim.warmup_steps + 1),
                "warmup_num_steps": cfg.optim.warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": cfg.optim.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, cfg.dist.deepspeed)


def build_engine(model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int, device: torch.device) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and the configured schedule."""
    import deepspeed

    from trainer.models.params import param_groups

    model.to(device)
    # Trainable parameters only (model.freeze, LoRA), one group per optim.lr_groups pattern.
    groups = param_groups(model, cfg.optim.lr, cfg.optim.lr_groups)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, total_steps, device),
        dist_init_required=False,
    )
    engine.checkpoint_engine = safe_checkpoint_engine()
    if world_size == 1 and cfg.dist.zero_stage == 0:
        # With one worker there is nothing to average; DeepSpeed would still flatten the gradients and all-reduce
        # them over the one-process group every step (about 5 % of a small model's CPU step).
        engine.enable_backward_allreduce = False
    return engine


def master_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The trained weights as fp32 CPU tensors: DeepSpeed's fp32 master copy of every parameter (assembled from
    the ZeRO partitions) rather than the module's own, which under bf16 are rounded copies of it.

    Collective under ZeRO 1-2 (the partitions are all-reduced): every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    # DeepSpeed's unfused fp16/bf16 optimizer (ZeRO 0 where its fused kernels are missing, e.g. on CPU) keeps
    # the masters in lists parallel to the module's parameters, without the mapping safe_get_full_fp32_param reads.
    low, high = getattr(engine.optimizer, "fp16_groups", None), getattr(engine.optimizer, "fp32_groups", None)
    unfused = {id(p): m for lows, highs in zip(low, high, strict=True) for p, m in zip(lows, highs, strict=True)} \
        if low is not None and high is not None else {}
    weights = {name: tensor.detach() for name, tensor in module.state_dict().items()}  # buffers included
    for name, param in module.named_parameters():
        master = safe_get_full_fp32_param(param)
        if master is None:
            master = unfused.get(id(param), param)
        weights[name] = master.detach()
    return {name: (t.float() if t.is_floating_point() else t).to("cpu").contiguous().clone()
            for name, t in weights.items()}


def init_distributed(cfg: Config) -> None:
    """Join (or create) the default process group: NCCL on GPU, gloo on CPU.

    Ray Train creates the group before the worker starts; torchrun leaves it to us (env://). A process started
    alone (`python -m trainer.train`) gets a one-process group over an in-memory store, because DeepSpeed
    needs a group even for one worker.
    """
    import datetime

    import torch.distributed as dist

    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the collectives' device routing use the current device
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # what a launcher would have set; DeepSpeed asserts LOCAL_RANK


def safe_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True`.

    DeepSpeed 0.19 loads its own checkpoint files with `weights_only=False`, which would run any pickled code
    in them. Its files hold tensors, numbers, strings and containers, plus a few DeepSpeed classes that are
    allow-listed here by name. Failed writes are recorded in `write_error` instead of raised (see
    trainer.checkpoint.save).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        write_error: str | None = None
        """The first failed write of the current save. Recorded, not raised: a rank that raised out of DeepSpeed's
        collective save would leave the others waiting at its barrier (trainer.checkpoint makes them agree)."""

        def save(self, state_dict: Any, path: str) -> None:
            if self.write_error is not None:
                return
            try:
                super().save(state_dict, path)
            except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
                self.write_error = f"{path}: {type(error).__name__}: {error}"

        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine()


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged
