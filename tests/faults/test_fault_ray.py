"""Under Ray (the `twinscale` CLI, 2 CPU workers): the driver's SIGTERM stops every worker cleanly with a
checkpoint (item 2), and a worker killed with SIGKILL is restarted by Ray with `dist.max_failures` and resumes
the newest checkpoint by itself (item 3). Both runs end with exactly the per-step losses and final metrics of
the uninterrupted torchrun reference: the same workers, stream, RNG streams and gloo reductions.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from faultrun import (
    TOTAL_STEPS,
    assert_same_run,
    complete_steps,
    environment,
    finish,
    steps_logged,
    twinscale,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Ray temp dir of this test's own (short: Ray's socket paths have a length limit), removed afterwards."""
    short = Path("/tmp") / f"tsr{os.getpid()}{tmp_path.name[-6:]}"
    short.mkdir(exist_ok=True)
    yield environment(RAY_TMPDIR=str(short))
    shutil.rmtree(short, ignore_errors=True)


def train_workers(driver: int) -> list[psutil.Process]:
    """The Ray Train worker processes of a driver's local Ray (not their forked DataLoader workers).

    Ray retitles a worker while it runs a method (`ray::RayTrainWorker.<method>`), and a loader worker forked from
    it keeps the title of its fork; torch names loader workers `pt_data_worker`, which tells them apart."""
    def is_worker(process: psutil.Process) -> bool:
        try:
            title = process.cmdline()[:1]
            return bool(title) and title[0].startswith("ray::RayTrainWorker") and process.name() != "pt_data_worker"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False

    return [child for child in psutil.Process(driver).children(recursive=True) if is_worker(child)]


def test_driver_sigterm_reaches_the_ray_workers(recipe: Path, reference: Path, ray_env: dict[str, str]) -> None:
    run_dir = recipe.parent / "runs" / "ray-stopped"
    run = twinscale("train", str(recipe), "--workers", "2", "--set", "name=ray-stopped", cwd=recipe.parent,
                    env=ray_env)
    wait_for(lambda: steps_logged(run_dir) >= 12, run)
    os.kill(run.pid, signal.SIGTERM)  # the driver only: Ray's workers hear of it through the driver
    code, output = finish(run, timeout=120)
    stopped = steps_logged(run_dir)
    assert code == 128 + signal.SIGTERM, output[-4000:]
    assert f"stopped by SIGTERM; newest checkpoint {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in output
    assert stopped < TOTAL_STEPS and max(complete_steps(run_dir)) == stopped
    code, output = finish(twinscale("resume", str(run_dir), cwd=recipe.parent, env=ray_env))
    assert code == 0, output[-4000:]
    assert_same_run(run_dir, reference)


def test_killed_worker_is_restarted_and_resumes(recipe: Path, reference: Path, ray_env: dict[str, str]) -> None:
    run_dir = recipe.parent / "runs" / "ray-crash"
    run = twinscale("train", str(recipe), "--workers", "2", "--set", "name=ray-crash", "--set",
                    "dist.max_failures=1", cwd=recipe.parent, env=ray_env)
    wait_for(lambda: steps_logged(run_dir) >= 23, run)  # past the checkpoint of step 20
    workers = train_workers(run.pid)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    killed_at = steps_logged(run_dir)
    workers[1].kill()  # SIGKILL one worker mid-run
    code, output = finish(run)
    assert code == 0, output[-4000:]
    assert killed_at < TOTAL_STEPS
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000020'} (step 20" in output, output[-4000:]
    assert_same_run(run_dir, reference)  # restarted from step 20 and finished as if never interrupted
