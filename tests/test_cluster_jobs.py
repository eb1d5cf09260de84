"""`twinscale submit` and `twinscale jobs` against a real Ray head (`ray start --head` on 127.0.0.1, free ports,
its own temp dir, token authentication on as Ray 2.60 has it by default)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FAKE_KEY = "wandb-key-from-the-users-environment-0123456789"


@pytest.fixture(scope="module")
def head() -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster()
    cluster.start_head(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def twinscale(*args: str, token: str | None, cwd: Path = ROOT, timeout: int = 400,
              home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_run(name: str, runs: Path, steps: int) -> list[str]:
    return ["configs/digits_vectors.yaml", "--set", f"name={name}", "--set", f"output_dir={runs}",
            "--set", f"optim.max_steps={steps}", "--set", "data.loader_workers=0", "--set", "eval.batch_size=256"]


@pytest.fixture(scope="module")
def submitted(head: LocalRayCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess,
                                                                                         Path]:
    """One tiny run submitted with --follow: 4 steps, checkpoints at steps 2 and 4."""
    runs = tmp_path_factory.mktemp("jobs") / "runs"
    result = twinscale("submit", *tiny_run("job-a", runs, 4), "--set", "checkpoint.every_steps=2",
                       "--address", head.dashboard_address, "--follow", token=head.token)
    return result, runs


def test_submit_follow_runs_on_the_cluster_with_the_users_environment(
        head: LocalRayCluster, submitted: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, runs = submitted
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "twinscale-job-a"
    assert "precision_at_1" in result.stdout  # the job's own final table, streamed back
    final = json.loads((runs / "job-a" / "final_metrics.json").read_text())
    assert final["step"] == 4 and 0 < final["map_at_r"] <= 1 and final["samples_seen"] == 4 * 64 * 2

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_address, headers={"Authorization": f"Bearer {head.token}"})
    info = client.get_job_info("twinscale-job-a")
    assert str(info.status) == "SUCCEEDED"
    assert info.runtime_env["env_vars"]["WANDB_API_KEY"] == FAKE_KEY  # sent with the job...
    for path in list(runs.rglob("*")) + list(ROOT.rglob("*.yaml")):  # ...and never written into a file
        if path.is_file() and path.stat().st_size < 10_000_000:
            assert FAKE_KEY.encode() not in path.read_bytes(), path

    listed = twinscale("jobs", "list", "--address", head.dashboard_address, token=head.token)
    assert listed.returncode == 0 and "twinscale-job-a" in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = twinscale("jobs", "logs", "twinscale-job-a", "--address", head.dashboard_address, token=head.token)
    assert logs.returncode == 0 and "map_at_r" in logs.stdout


def test_resume_a_submitted_run_as_a_job(head: LocalRayCluster,
                                        submitted: tuple[subprocess.CompletedProcess, Path]) -> None:
    """Drop the run's last checkpoint and outputs; `twinscale resume RUN_DIR --address http://…` continues it on
    the cluster from step 2 (the run's storage path is shared: same machine here)."""
    _, runs = submitted
    run_dir = runs / "job-a"
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "final_metrics.json").unlink()
    result = twinscale("resume", str(run_dir), "--address", head.dashboard_address, token=head.token)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith("twinscale-resume-")
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 4
    assert (run_dir / "checkpoints" / "step_00000004" / "run_state.json").is_file()


def test_stop_a_running_job_and_unknown_ids(head: LocalRayCluster, tmp_path: Path) -> None:
    submitted = twinscale("submit", *tiny_run("job-long", tmp_path / "runs", 100000), "--address",
                          head.dashboard_address, token=head.token)
    assert submitted.returncode == 0, submitted.stderr
    stopped = twinscale("jobs", "stop", "twinscale-job-long", "--address", head.dashboard_address, token=head.token)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    unknown = twinscale("jobs", "logs", "no-such-job", "--address", head.dashboard_address, token=head.token)
    assert unknown.returncode == 2 and "no job no-such-job" in unknown.stderr


def test_wrong_or_missing_token_exits_2(head: LocalRayCluster, tmp_path: Path) -> None:
    wrong = twinscale("jobs", "list", "--address", head.dashboard_address, token="0" * 64)
    assert wrong.returncode == 2 and "authentication failed: the token was refused" in wrong.stderr
    missing = twinscale("jobs", "list", "--address", head.dashboard_address, token=None, home=tmp_path)
    assert missing.returncode == 2 and "requires a token" in missing.stderr


def test_bad_config_is_refused_before_contacting_the_cluster(tmp_path: Path) -> None:
    result = twinscale("submit", "configs/digits_vectors.yaml", "--set", "optim.lrr=0.1",
                       "--address", "http://127.0.0.1:9", token=None)
    assert result.returncode == 2 and "optim.lrr" in result.stderr
    outside = tmp_path / "recipe.yaml"
    outside.write_text("optim: {lr: 0.01}\n")
    result = twinscale("submit", str(outside), "--address", "http://127.0.0.1:9", token=None)
    assert result.returncode == 2 and "inside the uploaded working directory" in result.stderr
