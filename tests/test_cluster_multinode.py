"""One run across two Ray nodes: a head and a second node joined on loopback (`ray start --address`), one CPU
each, so the 2 workers land one per node; each worker streams its own shards, mining and the loss see the
global batch, and both ranks write their parts of each checkpoint into the run's shared storage path. First, a
data path that exists only where the driver runs (a node-local disk, played by /proc/self/cwd) is refused by
every worker's preflight check (naming the node and the path), with one line and exit code 2 on the driver."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

LIST_WORKERS = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]  # explicit: other Ray instances may run on this machine
workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], limit=100)
print(json.dumps({"workers": [[w.job_id, w.node_id] for w in workers], "nodes": [n.node_id for n in nodes]}))
"""


def test_two_nodes_one_worker_each_shared_checkpoints(tmp_path: Path) -> None:
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        env = {**cluster.env, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
        env.pop("WANDB_API_KEY", None)

        def train(name: str, data: str, *extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "digits_vectors.yaml"),
                 "--address", cluster.gcs_address, "--workers", "2", "--set", f"name={name}",
                 "--set", f"data.train={data}/train", "--set", f"data.test={data}/test",
                 "--set", "data.loader_workers=0", "--set", "eval.batch_size=256", *extra],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

        # /proc/self/cwd/... is an absolute path that names a different directory in every process: here it
        # stands for a node-local disk (/scratch, a pod's own volume) that only the driver's node holds. The
        # driver writes the shards under its own working directory; Ray Train starts the workers in another one,
        # as if on another node: each worker refuses to start, naming its node and the path, and the driver ends
        # with that one line, exit 2.
        relative = f"data/driver-only-{tmp_path.name}"
        local = f"/proc/self/cwd/{relative}"
        refused = train("local-disk", local, "--set", "optim.max_steps=1")
        assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert f"on node {socket.gethostname()}" in errors[0] and f"data.train {local}/train: " in errors[0]
        assert "storage every node mounts" in errors[0]
        assert (tmp_path / relative / "train" / "index.json").is_file()  # it is there, on the driver's side only

        # The same shards by a relative path, which the driver resolves to an absolute path on storage every node
        # shares (here: the one file system), work.
        result = train("two-nodes", relative, "--set", "optim.max_steps=4",
                       "--set", "checkpoint.every_steps=2", "--set", "dist.zero_stage=1")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        listed = subprocess.run([sys.executable, "-c", LIST_WORKERS, cluster.gcs_address], env=env,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-3000:]
        placement = json.loads(listed.stdout)
    finally:
        cluster.stop()
    assert len(placement["nodes"]) == 2
    by_run: dict[str, list[str]] = {}  # the refused run's workers are listed too, under their own job
    for job, node in placement["workers"]:
        by_run.setdefault(job, []).append(node)
    assert len(by_run) == 2
    for nodes in by_run.values():
        assert len(nodes) == 2 and set(nodes) == set(placement["nodes"])  # one per node

    run_dir = tmp_path / "runs" / "two-nodes"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["samples_seen"] == 4 * 64 * 2  # global batch: 64 per worker × 2
    for step in ("step_00000002", "step_00000004"):
        files = {path.name for path in (run_dir / "checkpoints" / step).rglob("*optim_states.pt")}
        # ZeRO-1 partitions the optimizer: each node's rank writes its own part into the shared path
        assert any("rank_0" in name for name in files) and any("rank_1" in name for name in files), files
