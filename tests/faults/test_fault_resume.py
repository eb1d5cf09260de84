"""Exact resume (issue item 1) and graceful stop (item 2), with real processes and real signals.

Two ranks under torchrun train the real digits with dropout, a cross-batch memory and 2 DataLoader workers per
rank. An uninterrupted run is the reference; a run killed with SIGKILL (the whole job) and one stopped with
SIGTERM are resumed, and their per-step losses (train_loss.jsonl, the exact floats) must equal the
reference's bit for bit, as must the final metrics.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from faultrun import (
    TOTAL_STEPS,
    assert_same_run,
    complete_steps,
    finish,
    kill_job,
    steps_logged,
    torchrun,
    wait_for,
)

pytestmark = pytest.mark.slow


def resume_and_compare(recipe: Path, name: str, reference: Path, step: int) -> None:
    code, output = finish(torchrun(recipe, name, "--resume", cwd=recipe.parent))
    assert code == 0, output[-4000:]
    assert f"step_{step:08d} (step {step}," in output, output[-4000:]
    assert_same_run(recipe.parent / "runs" / name, reference)


def test_sigkill_of_the_whole_job_resumes_bitwise(recipe: Path, reference: Path) -> None:
    run_dir = recipe.parent / "runs" / "killed"
    run = torchrun(recipe, "killed", cwd=recipe.parent)
    wait_for(lambda: steps_logged(run_dir) >= 23, run)  # past the checkpoint of step 20, in the middle of epoch 1
    kill_job(run)
    run.communicate()
    assert not (run_dir / "final_metrics.json").exists()
    newest = max(complete_steps(run_dir))
    assert 20 <= newest < TOTAL_STEPS and newest % 16 != 0  # a mid-epoch checkpoint
    assert steps_logged(run_dir) > newest  # steps after the checkpoint were lost: the resume replays them
    resume_and_compare(recipe, "killed", reference, newest)


def test_sigterm_stops_cleanly_at_a_step_boundary_then_resumes_bitwise(recipe: Path, reference: Path) -> None:
    run_dir = recipe.parent / "runs" / "stopped"
    run = torchrun(recipe, "stopped", cwd=recipe.parent)
    wait_for(lambda: steps_logged(run_dir) >= 12, run)
    os.kill(run.pid, signal.SIGTERM)  # as a scheduler does before preemption; torchrun forwards it to the workers
    _, output = finish(run, timeout=60)  # torchrun itself exits non-zero after a signal
    stopped = steps_logged(run_dir)
    assert f"SIGTERM: stopped after step {stopped}, checkpoint saved" in output, output[-4000:]
    assert stopped < TOTAL_STEPS and max(complete_steps(run_dir)) == stopped  # both ranks saved the same step
    assert not (run_dir / "final_metrics.json").exists()
    resume_and_compare(recipe, "stopped", reference, stopped)
