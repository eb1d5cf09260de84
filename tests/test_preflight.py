"""Each worker's start check (trainer/preflight.py): data it cannot read on its node, or a run directory it cannot
write, fail at once with one line naming the node and the path. Here a worker whose working directory differs
from the one the shards were written in stands for a worker on another node (no Ray needed)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from trainer import config
from trainer.errors import UserError
from trainer.preflight import WorkerPathError, check_worker_paths


@pytest.fixture(scope="module")
def driver_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver's working directory, holding digits shards at data/digits/{train,test}."""
    root = tmp_path_factory.mktemp("driver")
    assert cli.main(["shards", "digits", "--kind", "labeled", "--out", str(root / "data" / "digits"),
                     "--test-fraction", "0.4"]) == 0
    return root


def run_config(output_dir: Path | str, train: str = "data/digits/train", test: str = "data/digits/test") -> Any:
    return config.load(None, [f"data.train={train}", f"data.test={test}", f"output_dir={output_dir}", "name=run"])


def test_relative_data_from_another_working_directory_names_node_and_path(
        driver_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    monkeypatch.chdir(worker_dir)
    with pytest.raises(WorkerPathError) as error:
        check_worker_paths(run_config(tmp_path / "runs"), rank=1)
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message
    assert message.startswith(f"worker 1 on node {socket.gethostname()}")
    assert f"data.train data/digits/train (here {worker_dir}/data/digits/train): no such directory" in message
    assert "storage every node mounts" in message
    assert not (tmp_path / "runs").exists()  # nothing written when the data is not there


def test_absolute_shared_paths_pass_and_leave_nothing_behind(driver_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tmp_path / "runs", str(driver_dir / "data/digits/train"), str(driver_dir / "data/digits/test"))
    check_worker_paths(cfg, rank=0)
    assert list((tmp_path / "runs" / "run").iterdir()) == []  # the probe file is removed again


def test_missing_shard_and_unwritable_run_dir(driver_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "copy"
    for split in ("train", "test"):
        (copy / split).mkdir(parents=True)
        for path in (driver_dir / "data/digits" / split).iterdir():
            (copy / split / path.name).write_bytes(path.read_bytes())
    (copy / "test" / "shard-000000.tar").unlink()
    with pytest.raises(WorkerPathError, match=r"data.test .*/copy/test: .*missing, e.g. shard-000000.tar"):
        check_worker_paths(run_config(tmp_path / "runs", str(copy / "train"), str(copy / "test")), rank=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkerPathError, match=rf"worker 0 on node .*: run directory {blocker}/runs/run "
                                              r"\(output_dir/name\) is not writable here"):
        check_worker_paths(run_config(blocker / "runs", str(copy / "train"), "null"), rank=0)
