"""A run across two Ray nodes that share no disk: shards and output_dir on the loopback S3 server, each node its
own working directory and run cache (TWINSCALE_RUN_CACHE), the driver a third place of its own.

Every Python process the two nodes start (Ray Train's controller, the workers, Ray's own actors) runs with an
audit hook (a sitecustomize.py on the nodes' PYTHONPATH) that records any file opened, created, renamed or
removed under the driver's directory: a path that exists only where the driver runs. The run trains a few steps
of the digits recipe, checkpoints to S3 (each node publishing its own rank's ZeRO-1 partition), exports, and
`twinscale resume s3://…/runs/NAME` continues it from S3 to the same result; no process of the nodes touched
the driver's directory, and the driver's run cache holds the run's outputs only (no checkpoint).

    python -m pytest -q -p no:cacheprovider tests/test_nodes_no_shared_disk.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from faults.faultrun import final_metrics, losses
from ray_cluster import LocalRayCluster

from tests.test_remote import s3_env
from tests.test_remote_training import remote_run
from trainer.data import remote

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

AUDIT = '''\
"""Test audit hook: records file operations of this process under $TWINSCALE_TEST_FORBIDDEN."""
import os
import sys

_FORBIDDEN = os.environ.get("TWINSCALE_TEST_FORBIDDEN")
_LOG = os.environ.get("TWINSCALE_TEST_AUDIT_LOG")
_EVENTS = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.copyfile",
           "shutil.rmtree", "os.truncate", "os.symlink", "os.link", "os.chmod"}


def _hook(event, args):
    if event not in _EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str):
        return
    path = os.path.abspath(path)
    if path == _FORBIDDEN or path.startswith(_FORBIDDEN + os.sep):
        line = f"{os.getpid()} {event} {path} {' '.join(sys.argv[:2])}\\n".encode()
        descriptor = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(descriptor, line)
        os.close(descriptor)


if _FORBIDDEN and _LOG:
    sys.addaudithook(_hook)
'''


def test_two_nodes_share_no_path_train_checkpoint_export_resume(s3_server: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s3_env(monkeypatch, s3_server)
    fs, _ = remote.filesystem("s3://no-shared-disk")
    fs.mkdir("no-shared-disk")
    driver, audit = tmp_path / "driver", tmp_path / "audit"
    driver.mkdir()
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    log = tmp_path / "audit.log"
    aws = {name: value for name, value in s3_environment(s3_server).items()}

    def node(name: str) -> tuple[dict[str, str], Path]:
        home = tmp_path / name
        home.mkdir()
        return {**aws, "TWINSCALE_RUN_CACHE": str(home / "cache"), "PYTHONPATH": f"{audit}:{ROOT}",
                "TWINSCALE_TEST_FORBIDDEN": str(driver), "TWINSCALE_TEST_AUDIT_LOG": str(log)}, home

    cluster = LocalRayCluster()
    try:
        head_env, head = node("node-head")
        cluster.start_head(num_cpus=1, env=head_env, cwd=head)
        other_env, other = node("node-other")
        cluster.add_node(num_cpus=1, env=other_env, cwd=other, ip="127.0.0.2")  # one uploader per node address
        env = {**cluster.env, **aws, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
               "TWINSCALE_RUN_CACHE": str(driver / "cache")}
        env.pop("WANDB_API_KEY", None)

        def twinscale(*args: str) -> subprocess.CompletedProcess:
            done = subprocess.run([sys.executable, "-m", "launch.cli", *args, "--address", cluster.gcs_address],
                                  cwd=driver, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
            return done

        # digits_vectors writes its shards from data.source on the first run: here straight to S3, by the driver
        twinscale("train", str(ROOT / "configs" / "digits_vectors.yaml"), "--workers", "2",
                  "--set", "name=nodes", "--set", "data.train=s3://no-shared-disk/digits/train",
                  "--set", "data.test=s3://no-shared-disk/digits/test", "--set", "output_dir=s3://no-shared-disk/runs",
                  "--set", "optim.max_steps=4", "--set", "checkpoint.every_steps=2", "--set", "dist.zero_stage=1",
                  "--set", "data.loader_workers=0", "--set", "eval.batch_size=256")
        url = "s3://no-shared-disk/runs/nodes"
        whole = remote_run(url, tmp_path / "whole")
        # A crash after step 2's checkpoint: step 4's is never marked complete (its run_state.json is gone).
        fs.rm_file("no-shared-disk/runs/nodes/checkpoints/step_00000004/run_state.json")
        resumed = twinscale("resume", url)
    finally:
        cluster.stop()
    touched = log.read_text() if log.exists() else ""
    assert not touched, touched[:3000]  # no process of either node opened or wrote a path under the driver's

    assert url in resumed.stdout, resumed.stdout  # the run is shown by its URL, not the driver's mirror
    cut = remote_run(url, tmp_path / "resumed")
    assert final_metrics(cut) == final_metrics(whole) and final_metrics(whole)["step"] == 4
    assert losses(cut) == losses(whole) and [step for step, _ in losses(whole)] == [1, 2, 3, 4]
    assert (cut / "model").is_dir() and (cut / "timeline.json").is_file()
    for step in ("step_00000002", "step_00000004"):
        names = {path.name for path in (cut / "checkpoints" / step).rglob("*optim_states.pt")}
        assert any("rank_0" in n for n in names) and any("rank_1" in n for n in names), names  # one per node
    # Each node worked in its own mirror; the driver's holds the outputs it fetched, never a checkpoint.
    mirrors = [home / "cache" / "s3" / "no-shared-disk" / "runs" / "nodes" for home in (head, other)]
    assert all(mirror.is_dir() for mirror in mirrors)
    driver_mirror = driver / "cache" / "s3" / "no-shared-disk" / "runs" / "nodes"
    assert (driver_mirror / "final_metrics.json").is_file() and not (driver_mirror / "checkpoints").exists()
    # Writes that bypass Python's audit hooks (pyarrow's and safetensors' native file I/O): every file under the
    # driver's directory is one the driver fetched from S3 (or its own timeline.json), none of Ray Train's state.
    for path in (p for p in driver.rglob("*") if p.is_file()):
        relative = path.relative_to(driver_mirror)
        assert relative.parts[0] not in ("ray", "checkpoints") and (cut / relative).is_file(), relative
    config = (cut / "config.yaml").read_text()
    assert "testing" not in config and "AWS_" not in config  # credentials stay in the environment


def s3_environment(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint}


def test_audit_hook_records_a_driver_path(tmp_path: Path) -> None:
    """The check above can fail: a process with the hook that opens a file under the forbidden path is logged."""
    (tmp_path / "sitecustomize.py").write_text(AUDIT)
    forbidden = tmp_path / "driver"
    forbidden.mkdir()
    (forbidden / "only-here.txt").write_text("x")
    log = tmp_path / "log"
    env = {"PYTHONPATH": str(tmp_path), "TWINSCALE_TEST_FORBIDDEN": str(forbidden),
           "TWINSCALE_TEST_AUDIT_LOG": str(log), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", f"open({str(forbidden / 'only-here.txt')!r}).read(); open('/dev/null')"],
                   env=env, check=True, timeout=60)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and "only-here.txt" in lines[0] and " open " in lines[0], lines


def test_resume_on_a_node_whose_mirror_saw_the_checkpoint_from_another_rank(s3_server: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks may land on other nodes when a run resumes: a node whose mirror holds the newest checkpoint as rank 0
    saved it (its own files and run_state.json, not rank 1's) gets the missing files from S3, and a newer local
    checkpoint the storage never marked complete is dropped — every node resumes the storage's newest one."""
    from trainer.remote_runs import fetch_run, local_mirror

    s3_env(monkeypatch, s3_server)
    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path / "node"))
    fs, _ = remote.filesystem("s3://moved-ranks")
    fs.mkdir("moved-ranks")
    url = "s3://moved-ranks/runs/moved"
    files = {"config.yaml": b"name: moved\n", "checkpoints/step_00000002/run_state.json": b"{}",
             "checkpoints/step_00000002/rank_0.pt": b"zero", "checkpoints/step_00000002/rank_1.pt": b"one"}
    for name, data in files.items():
        fs.pipe_file(f"moved-ranks/runs/moved/{name}", data)
    mirror = local_mirror(url)
    for name in ("checkpoints/step_00000002/run_state.json", "checkpoints/step_00000002/rank_0.pt",
                 "checkpoints/step_00000004/run_state.json", "checkpoints/step_00000004/rank_0.pt"):
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(files.get(name, b"local"))
    assert fetch_run(url) == mirror
    assert sorted(p.name for p in (mirror / "checkpoints").iterdir()) == ["step_00000002"]
    assert (mirror / "checkpoints/step_00000002/rank_1.pt").read_bytes() == b"one"
    assert not list(mirror.rglob(".fetching-*"))


def test_submit_and_resume_an_object_storage_run_as_jobs(s3_server: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/digits_s3.yaml submitted as is (but its bucket and length): the cluster's own credentials (its
    nodes' environment, as a Kubernetes Secret gives them) reach the bucket, the submitter sends none; the job
    writes the demo's shards and the run to S3, and `twinscale resume s3://… --address http://…` resumes it as a
    job."""
    s3_env(monkeypatch, s3_server)
    fs, _ = remote.filesystem("s3://jobs-on-s3")
    fs.mkdir("jobs-on-s3")
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=2, env={**s3_environment(s3_server), "TWINSCALE_RUN_CACHE": str(tmp_path / "head")},
                           cwd=tmp_path)
        env = {name: value for name, value in cluster.env.items() if not name.startswith("AWS_")}
        env.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT))

        def twinscale(*args: str) -> subprocess.CompletedProcess:
            done = subprocess.run([sys.executable, "-m", "launch.cli", *args, "--address", cluster.dashboard_address],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
            return done

        submitted = twinscale("submit", "configs/digits_s3.yaml", "--follow", "--set", "name=job",
                              "--set", "data.train=s3://jobs-on-s3/data/digits-images/train",
                              "--set", "data.test=s3://jobs-on-s3/data/digits-images/test",
                              "--set", "output_dir=s3://jobs-on-s3/runs", "--set", "optim.max_steps=2",
                              "--set", "checkpoint.every_steps=2", "--set", "dist.workers=1",
                              "--set", "data.loader_workers=0")
        assert "cluster's own credentials" in submitted.stderr and "warning" not in submitted.stderr
        assert "s3://jobs-on-s3/runs/job" in submitted.stdout  # the job's final table names the run by its URL
        assert fs.isfile("jobs-on-s3/data/digits-images/train/index.json")  # the demo's shards, written by the job
        fs.rm_file("jobs-on-s3/runs/job/final_metrics.json")
        resumed = twinscale("resume", "s3://jobs-on-s3/runs/job")
    finally:
        cluster.stop()
    assert resumed.stdout.splitlines()[0].startswith("twinscale-resume-")
    assert json.loads(fs.cat_file("jobs-on-s3/runs/job/final_metrics.json"))["step"] == 2
