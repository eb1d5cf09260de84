"""`model/` holds what was trained: DeepSpeed's fp32 master weights, not the bf16 copies the module computes with.

bf16 runs on CPU too, so this is tested here: a bf16 run's export is float32, rounds to exactly the module's bf16
weights saved in the final checkpoint, and carries the precision bf16 drops (an export of the module's own
weights, cast up, would be bf16-representable everywhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.engine.engine import safe_checkpoint_engine

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SETTINGS = ["--set", "optim.max_steps=12", "--set", "optim.warmup_steps=2", "--set", "dist.precision=bf16"]


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device,zero_stage", [("cpu", 0), ("cpu", 2), pytest.param("cuda", 0, marks=ON_GPU),
                                               pytest.param("cuda", 2, marks=ON_GPU)])
def test_bf16_run_exports_fp32_master_weights(digits_recipe: Path, device: str, zero_stage: int) -> None:
    name = f"{device}-zero{zero_stage}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "trainer.train", str(digits_recipe), *SETTINGS, "--set", f"name={name}",
               "--set", f"dist.zero_stage={zero_stage}", "--set", f"dist.device={device}"]
    done = subprocess.run(command, cwd=digits_recipe.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_dir = digits_recipe.parent / "runs" / name
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    saved = safe_checkpoint_engine().load(str(run_dir / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt"))
    module = {name: tensor.cpu() for name, tensor in saved["module"].items()}
    assert set(exported) == set(module)
    lost = 0
    for name, weight in exported.items():
        assert weight.dtype == torch.float32, name
        assert module[name].dtype == torch.bfloat16, name
        assert torch.equal(weight.to(torch.bfloat16), module[name]), f"{name}: not the master of the bf16 weights"
        lost += int((weight.to(torch.bfloat16).float() != weight).sum())
    total = sum(weight.numel() for weight in exported.values())
    assert lost > total // 2, f"only {lost} of {total} exported values carry more than bf16 precision"
