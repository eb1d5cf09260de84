"""Checkpoint integrity (item 4): a save becomes the newest checkpoint only once every rank has written it, so a
failed save (here a real write failure: the kernel's file-size limit, as on a full disk) leaves the previous
checkpoint as the newest, loadable one; resuming from it gives exactly the uninterrupted run.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from faultrun import assert_same_run, complete_steps, finish, steps_logged, torchrun, wait_for

from trainer import checkpoint
from trainer.checkpoint import STAGING_PREFIX, STATE_FILE, capture_rng, latest_checkpoint, restore_rng, rng_path

FILE_SIZE_LIMIT = 12_000  # bytes: train_loss.jsonl stays below it; every checkpoint file is larger


def test_staging_and_unmarked_directories_are_never_latest(tmp_path: Path) -> None:
    root = checkpoint.checkpoints_dir(tmp_path)
    for name, marked in (("step_00000005", True), ("step_00000010", False), (f"{STAGING_PREFIX}step_00000015", True)):
        (root / name).mkdir(parents=True)
        (root / name / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if marked:
            (root / name / STATE_FILE).write_text('{"step": 1}')
    assert latest_checkpoint(tmp_path) == root / "step_00000005"


def test_rng_states_round_trip_through_safetensors(tmp_path: Path) -> None:
    tensors, metadata = capture_rng()
    from safetensors.torch import save_file

    save_file(tensors, rng_path(tmp_path, 3), metadata=metadata)
    expected = (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random())
    restore_rng(rng_path(tmp_path, 3))
    assert (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()) == expected


def ranks(torchrun_pid: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(torchrun_pid).children(recursive=True)
            if "trainer.train" in " ".join(child.cmdline())]


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint(recipe: Path, reference: Path) -> None:
    run_dir = recipe.parent / "runs" / "disk-full"
    run = torchrun(recipe, "disk-full", cwd=recipe.parent)
    wait_for(lambda: steps_logged(run_dir) >= 21, run)  # the checkpoint of step 20 is complete
    for process in ranks(run.pid):  # from now on no file of theirs may grow beyond the limit: writes fail
        process.rlimit(psutil.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    code, output = finish(run)
    assert code != 0
    failed = re.search(r"step_(\d{8}): checkpoint could not be written: .*File too large", output)
    assert failed, output[-4000:]
    newest = int(failed.group(1)) - 5
    assert f"the newest complete checkpoint is runs/disk-full/checkpoints/step_{newest:08d}" in output
    assert complete_steps(run_dir)[-1] == newest and not list((run_dir / "checkpoints").glob(f"{STAGING_PREFIX}*"))
    code, output = finish(torchrun(recipe, "disk-full", "--resume", cwd=recipe.parent))
    assert code == 0, output[-4000:]
    assert f"step_{newest:08d} (step {newest}," in output
    assert_same_run(run_dir, reference)
