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

from launch.cli import main as twinscale
from trainer.engine.engine import safe_checkpoint_engine

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

RECIPE = """\
data: {{train: {root}/digits/train, test: {root}/digits/test, batch_size: 64}}
model: {{encoder: mlp, hidden_dims: [64], embedding_dim: 16}}
loss: {{name: supcon}}
mining: {{name: none}}
optim: {{max_steps: 12, warmup_steps: 2}}
dist: {{precision: bf16}}
log: {{wandb: false}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    assert twinscale(["shards", "digits", "--kind", "labeled", "--out", str(root / "digits"), "--test-fraction",
                      "0.4", "--samples-per-shard", "128"]) == 0
    path = root / "recipe.yaml"
    path.write_text(RECIPE.format(root=root))
    return path


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_run_exports_fp32_master_weights(recipe: Path, zero_stage: int) -> None:
    name = f"zero{zero_stage}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "trainer.train", str(recipe), "--set", f"name={name}", "--set",
                           f"dist.zero_stage={zero_stage}"], cwd=recipe.parent, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_dir = recipe.parent / "runs" / name
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    saved = safe_checkpoint_engine().load(str(run_dir / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt"))
    module = saved["module"]
    assert set(exported) == set(module)
    lost = 0
    for name, weight in exported.items():
        assert weight.dtype == torch.float32, name
        assert module[name].dtype == torch.bfloat16, name
        assert torch.equal(weight.to(torch.bfloat16), module[name]), f"{name}: not the master of the bf16 weights"
        lost += int((weight.to(torch.bfloat16).float() != weight).sum())
    total = sum(weight.numel() for weight in exported.values())
    assert lost > total // 2, f"only {lost} of {total} exported values carry more than bf16 precision"
