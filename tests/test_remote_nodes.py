"""Two ranks on two "nodes" that share no disk (each its own run cache), checkpointing to the loopback S3 server:
each node publishes the files its rank wrote, rank 0 marks the checkpoint complete, and two fresh nodes resume
from S3 alone, each finding its own rank's files."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from spawned import run_ranks

pytestmark = pytest.mark.slow


class FakeEngine:
    """What checkpoint.save/load call on a DeepSpeed engine: one file per rank, as ZeRO's partitions are."""

    def __init__(self, rank: int, step: int = 0) -> None:
        self.rank, self.step = rank, step
        self.checkpoint_engine = SimpleNamespace(write_error=None)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / f"zero_rank_{self.rank}.pt").write_bytes(f"rank {self.rank} step {self.step}".encode())

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool) -> tuple[str | None, dict]:
        path = Path(load_dir) / tag / f"zero_rank_{self.rank}.pt"
        return (str(path), {}) if path.read_bytes() == f"rank {self.rank} step {self.step}".encode() else (None, {})


def _nodes(rank: int, world: int, endpoint: str, root: str, url: str) -> None:
    from trainer import checkpoint, remote_runs
    from trainer.checkpoint import RunState

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint, LOCAL_RANK="0", TWINSCALE_RUN_CACHE=f"{root}/node-{rank}")
    run_dir = remote_runs.local_mirror(url)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: nodes\n")
    for step in (10, 20, 30):
        checkpoint.save(FakeEngine(rank, step), run_dir, RunState(step=step, world_size=world), keep_last=2, rank=rank)
    if rank == 1:  # no staging left behind, no complete checkpoint of its own: its files are only on S3
        assert not list((run_dir / "checkpoints").iterdir())
    os.environ["TWINSCALE_RUN_CACHE"] = f"{root}/fresh-{rank}"
    state = checkpoint.load(FakeEngine(rank, 30), remote_runs.local_mirror(url), rank, world)
    assert state.step == 30 and state.world_size == 2


def test_nodes_without_a_shared_disk_checkpoint_to_s3_and_resume(s3_server: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_remote import s3_env
    from trainer.data import remote

    s3_env(monkeypatch, s3_server)
    fs, _ = remote.filesystem("s3://two-nodes")
    fs.mkdir("two-nodes")
    run_ranks(_nodes, 2, s3_server, str(tmp_path), "s3://two-nodes/runs/nodes")
    names = sorted(name.rsplit("/", 1)[1] for name in fs.find("two-nodes/runs/nodes/checkpoints"))
    assert names == sorted(["run_state.json", "rng_rank_00000.safetensors", "rng_rank_00001.safetensors",
                            "zero_rank_0.pt", "zero_rank_1.pt"] * 2)  # steps 20 and 30 (keep_last 2)
