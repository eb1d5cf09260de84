"""Helpers of the fault tests: real runs in subprocesses (torchrun or the `twinscale` CLI over Ray), real signals.

A run is started in a session of its own; `kill_job` SIGKILLs it with everything it started, so that nothing of
it survives a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Digits vectors, a small MLP with dropout (so the torch RNG stream matters), multi-similarity with a cross-batch
# memory (so the bank must be restored), 2 loader workers per rank, checkpoints every 5 steps: 64 steps on 2 ranks.
RECIPE = """\
data: {{train: {shards}/train, test: {shards}/test, batch_size: 32, loader_workers: 2}}
model: {{encoder: mlp, hidden_dims: [64], embedding_dim: 16, dropout: 0.1}}
loss: {{name: multi_similarity}}
mining: {{name: multi_similarity, memory_size: 256, memory_start_step: 3}}
optim: {{epochs: 4, warmup_steps: 2}}
checkpoint: {{every_steps: 5, keep_last: 2}}
eval: {{every_steps: 20}}
log: {{wandb: false}}
"""
TOTAL_STEPS = 64  # 4 epochs × 16 batches of 32 per rank (1078 training digits, 2 ranks × 2 loader workers)


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def write_digits(directory: Path) -> Path:
    """The real scikit-learn digits as labeled vector shards (train/test) and the recipe above for them."""
    subprocess.run([sys.executable, "-m", "launch.cli", "shards", "digits", "--kind", "labeled", "--out",
                    str(directory / "digits"), "--test-fraction", "0.4", "--samples-per-shard", "64"],
                   check=True, capture_output=True, env=environment(), cwd=directory, timeout=120)
    recipe = directory / "recipe.yaml"
    recipe.write_text(RECIPE.format(shards=directory / "digits"))
    return recipe


def torchrun(recipe: Path, name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m trainer.train RECIPE --set name=NAME ...`, in a session of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "trainer.train", str(recipe), "--set", f"name={name}", *args]
    return subprocess.Popen(command, cwd=cwd, env=env or environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def twinscale(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The `twinscale` CLI (Ray launcher), in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=cwd, env=env or environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a run; kill its whole session if it overstays. Returns (exit code, output)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(process)
        output, _ = process.communicate()
        raise AssertionError(f"run did not end within {timeout} s:\n{output[-4000:]}") from None
    return process.returncode, output


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until `condition` holds; fail (and kill the run) if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            code, output = (process.returncode, process.stdout.read() if process.stdout else "") \
                if process.poll() is not None else finish_killed(process)
            raise AssertionError(f"condition not reached (exit {code}):\n{output[-4000:]}")
        time.sleep(0.02)


def finish_killed(process: subprocess.Popen) -> tuple[int, str]:
    kill_job(process)
    output, _ = process.communicate()
    return process.returncode, output


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started, all at once (torchrun puts each worker in a session of its
    own, so a process group does not cover the job; a node failure or an OOM kill of the job's cgroup does)."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


def steps_logged(run_dir: Path) -> int:
    """The last step in train_loss.jsonl (0 before the first)."""
    path = run_dir / "train_loss.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def losses(run_dir: Path) -> list[tuple[int, float | None]]:
    """(step, loss) of every line of train_loss.jsonl, losses as the exact floats that were logged."""
    rows = [json.loads(line) for line in (run_dir / "train_loss.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def complete_steps(run_dir: Path) -> list[int]:
    from trainer.checkpoint import complete_checkpoints

    return [int(path.name[5:]) for path in complete_checkpoints(run_dir)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def final_metrics(run_dir: Path) -> dict:
    """final_metrics.json without its timings."""
    final = json.loads((run_dir / "final_metrics.json").read_text())
    return {key: value for key, value in final.items() if key not in ("wall_s", "train_samples_per_s")}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise: the same loss floats at every step, and the same final metrics."""
    assert losses(run_dir) == losses(reference)
    assert final_metrics(run_dir) == final_metrics(reference)
