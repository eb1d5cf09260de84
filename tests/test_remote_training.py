"""End to end from object storage: an img2dataset-style shard set (written by plain `tarfile` in
tests/foreign_shards.py, not by Twinscale) served by a real S3-compatible server on loopback, trained with
`python -m trainer.train` (one worker, no Ray) through a field map (caption text → input, json.label → class);
a run cut short and resumed equals an uninterrupted one bit for bit, and the model beats the untrained one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults.faultrun import final_metrics, losses, steps_logged

from tests.foreign_shards import write_img2dataset_shards
from trainer.data import remote
from trainer.data.scan import scan
from trainer.remote_runs import remote_checkpoints

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

RECIPE = """\
data:
  train: "{bucket}/train/{{00000..00003}}.tar"
  test: "{bucket}/test/{{00000..00001}}.tar"
  fields: {{input: txt, label: json.label}}
  batch_size: 32
  loader_workers: 1
model: {{encoder: text, text_dim: 32, embedding_dim: 16, dropout: 0.1}}
loss: {{name: supcon}}
mining: {{name: none}}
optim: {{epochs: 10, warmup_steps: 2, lr: 0.01}}
checkpoint: {{every_steps: 5}}
log: {{wandb: false}}
output_dir: {output_dir}
"""


def s3_environment(endpoint: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def bucket(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Train (4 × 40) and test (2 × 40) img2dataset-style shards on the loopback S3 server, scanned there."""
    os.environ.update({k: v for k, v in s3_environment(s3_server).items() if k.startswith("AWS_")})
    url = "s3://img2dataset-e2e"
    fs, _ = remote.filesystem(url)
    fs.mkdir("img2dataset-e2e")
    local = tmp_path_factory.mktemp("e2e")
    for split, shards, start in (("train", 4, 0), ("test", 2, 1000)):
        for path in write_img2dataset_shards(local / split, shards=shards, per_shard=40, seed=start, start=start):
            fs.put_file(str(path), f"img2dataset-e2e/{split}/{path.name}")
        scan(f"{url}/{split}/*.tar", f"{url}/{split}/index.json")
    return url


def start(recipe: Path, endpoint: str, *settings: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "trainer.train", str(recipe),
               *[s if s.startswith("--") else f"--set={s}" for s in settings]]
    return subprocess.Popen(command, cwd=recipe.parent, env=s3_environment(endpoint), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def train(recipe: Path, endpoint: str, *settings: str) -> str:
    run = start(recipe, endpoint, *settings)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-4000:]
    return output


def stop_after(run: subprocess.Popen[str], run_dir: Path, step: int) -> str:
    """SIGTERM (a scheduler's preemption) once `step` steps are logged: the run saves at a step boundary."""
    deadline = time.monotonic() + 300
    while steps_logged(run_dir) < step and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, output[-4000:]
    return output


def test_trains_from_s3_and_resumes_exactly(bucket: str, s3_server: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(bucket=bucket, output_dir=tmp_path / "runs"))
    train(recipe, s3_server, "name=whole")
    whole, cut = tmp_path / "runs" / "whole", tmp_path / "runs" / "cut"
    stop_after(start(recipe, s3_server, "name=cut"), cut, 8)
    assert not (cut / "final_metrics.json").exists() and 8 <= steps_logged(cut) < 50
    train(recipe, s3_server, "name=cut", "--resume")
    assert losses(cut) == losses(whole) and len(losses(whole)) == 50  # 160 samples / 32 × 10 epochs
    assert final_metrics(cut) == final_metrics(whole)
    untrained = train(recipe, s3_server, "name=untrained", "optim.max_steps=1", "optim.lr=0.000000001")
    assert "map_at_r" in untrained
    trained_map = final_metrics(whole)["map_at_r"]
    untrained_map = final_metrics(tmp_path / "runs" / "untrained")["map_at_r"]
    assert trained_map > 0.8 > untrained_map, (trained_map, untrained_map)  # measured 0.994 and 0.144


def remote_run(url: str, into: Path) -> Path:
    """The files of a run as object storage holds them (not the local mirror the run wrote them through)."""
    fs, root = remote.filesystem(url)
    for name in fs.find(root):
        local = into / name[len(root):].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(local))
    return into


def test_run_outputs_on_s3_killed_and_resumed_from_there(bucket: str, s3_server: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs = f"{bucket}/runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(bucket=bucket, output_dir=runs) + "dist: {workers: 1}\n")
    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path / "node-a"))
    train(recipe, s3_server, "name=whole")
    stop_after(start(recipe, s3_server, "name=cut"), tmp_path / "node-a" / "s3" / runs[5:] / "cut", 8)
    complete, incomplete = remote_checkpoints(f"{runs}/cut")
    assert complete and not incomplete and len(complete) <= 2  # keep_last 2, published atomically
    # Resumed on a machine that has none of the run's files: everything comes from the S3 server.
    monkeypatch.setenv("TWINSCALE_RUN_CACHE", str(tmp_path / "node-b"))
    done = subprocess.run([sys.executable, "-m", "launch.cli", "resume", f"{runs}/cut"], cwd=tmp_path,
                          env={**s3_environment(s3_server), "TWINSCALE_RUN_CACHE": str(tmp_path / "node-b")},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    whole, cut = remote_run(f"{runs}/whole", tmp_path / "whole"), remote_run(f"{runs}/cut", tmp_path / "cut")
    assert losses(cut) == losses(whole) and len(losses(whole)) == 50
    assert final_metrics(cut) == final_metrics(whole) and (cut / "model").is_dir()
    assert "AWS_SECRET_ACCESS_KEY" not in (cut / "config.yaml").read_text() and "testing" not in \
        (cut / "config.yaml").read_text()
