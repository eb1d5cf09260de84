"""One worker without Ray: `python -m trainer.train RECIPE` and `torchrun --nproc_per_node 1 -m trainer.train`.

DeepSpeed needs a process group even for one worker; a process started alone gets one over an in-memory store,
torchrun's single rank one over env://. Both must train, checkpoint, resume and export like a Ray run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults.faultrun import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SETTINGS = ["--set", "optim.epochs=4", "--set", "optim.warmup_steps=4", "--set", "checkpoint.every_steps=10"]


def _run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


LAUNCHERS = {
    "python": [sys.executable, "-m", "trainer.train"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "{port}",
                 "-m", "trainer.train"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_one_worker_trains_resumes_and_exports(digits_recipe: Path, launcher: str) -> None:
    launch = [part.format(port=free_port()) for part in LAUNCHERS[launcher]]
    command = [*launch, str(digits_recipe), *SETTINGS, "--set", f"name={launcher}"]
    _run([*command, "--set", "optim.max_steps=30"], digits_recipe.parent)
    run_dir = digits_recipe.parent / "runs" / launcher
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    # Resume the same run to its full length (4 epochs of 16 batches: 64 steps).
    _run([*command, "--resume"], digits_recipe.parent)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 64 and (run_dir / "model" / "model.safetensors").is_file()
    assert final["map_at_r"] > 0.7  # raw pixels: 0.53; this recipe measured 0.75
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 30, 64]  # the step-0 baseline once: not repeated on resume
    assert evals[0]["map_at_r"] < final["map_at_r"] - 0.2  # what the run gained over its starting model
