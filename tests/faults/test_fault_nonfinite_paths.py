"""Non-finite steps on the paths the plain one does not cover: with the cross-batch memory (a skipped step must
leave nothing in the bank), with the feature cache (the guard must see the loss, at ZeRO 0 and at ZeRO 2,
where no gradient is visible before DeepSpeed's own step) and with ZeRO 1-2 without it.

One process without Ray (`python -m trainer.train`), on the poisoned digits of test_fault_numerics: two training
digits hold NaN pixels, so at most two steps per epoch have a NaN loss; every other step must train normally.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faultrun import environment
from safetensors.numpy import load_file
from test_fault_numerics import poisoned  # noqa: F401 (the shared fixture)

pytestmark = pytest.mark.slow

POISONED_PER_EPOCH = 2  # training digits with NaN pixels: at most this many NaN steps per epoch
EPOCHS = 3


def one_process(root: Path, name: str, *overrides: str) -> tuple[Path, dict]:
    command = [sys.executable, "-m", "trainer.train", str(root / "recipe.yaml"), "--set", f"name={name}",
               "--set", f"optim.epochs={EPOCHS}", "--set", "optim.max_nonfinite_steps=50", *overrides]
    done = subprocess.run(command, cwd=root, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_dir = root / "runs" / name
    return run_dir, json.loads((run_dir / "final_metrics.json").read_text())


def skipped_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "train_loss.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row.get("skipped")]


def assert_trained_despite_nan(run_dir: Path, final: dict) -> None:
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(np.isfinite(value).all() for value in weights.values()), "a NaN update reached the weights"
    assert 1 <= len(skipped_steps(run_dir)) <= POISONED_PER_EPOCH * EPOCHS, skipped_steps(run_dir)
    assert final["map_at_r"] > 0.7  # raw pixels: 0.53; an untrained or NaN-poisoned model is far below


def test_skipped_step_leaves_nothing_in_the_memory_bank(poisoned: Path) -> None:  # noqa: F811
    # A bank of 4 global batches: a NaN row left in it would make the next 4 steps NaN as well.
    run_dir, final = one_process(poisoned, "memory", "--set", "mining.memory_size=128")
    assert_trained_despite_nan(run_dir, final)
    memory = load_file(str(sorted((run_dir / "checkpoints").iterdir())[-1] / "memory.safetensors"))
    assert np.isfinite(memory["embeddings"]).all() and len(memory["embeddings"]) == 128


@pytest.mark.parametrize("feature_cache,zero_stage", [(True, 0), (True, 2), (False, 1), (False, 2)])
def test_nan_step_is_skipped_with_zero_and_the_feature_cache(poisoned: Path, feature_cache: bool,  # noqa: F811
                                                            zero_stage: int) -> None:
    """With ZeRO 1-2 the gradients live in DeepSpeed's partitions; with the feature cache the step is replayed:
    a NaN batch is skipped on every path, and nothing of it lingers to poison the steps after it."""
    cache = ["--set", "optim.feature_cache=true", "--set", "optim.gradient_accumulation_steps=2"] \
        if feature_cache else []
    run_dir, final = one_process(poisoned, f"cache{int(feature_cache)}-zero{zero_stage}", *cache, "--set",
                                 f"dist.zero_stage={zero_stage}")
    assert_trained_despite_nan(run_dir, final)
