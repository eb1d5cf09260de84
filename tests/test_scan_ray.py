"""`twinscale scan --address local`: shards counted by Ray tasks give the same index as the process pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.foreign_shards import write_img2dataset_shards
from trainer.data.scan import scan

pytestmark = pytest.mark.slow


def test_ray_tasks_count_like_the_pool(tmp_path: Path) -> None:
    write_img2dataset_shards(tmp_path, shards=20, per_shard=7)  # 2 tasks of up to 16 shards
    spec = f"{tmp_path}/{{00000..00019}}.tar"
    pooled = scan(spec, str(tmp_path / "pool.json"))
    done = subprocess.run([sys.executable, "-m", "launch.cli", "scan", spec, "--out", str(tmp_path / "ray.json"),
                           "--address", "local"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    counted = json.loads((tmp_path / "ray.json").read_text())
    assert counted["shards"] == pooled["shards"] and counted["num_samples"] == 140
