"""A real Ray cluster for tests, started with `ray start` on 127.0.0.1: a head and optionally more nodes, every
port picked free, its own temp dir, token authentication on (Ray 2.60's default) with a token made here.

Stopping kills only the processes of this cluster (found by its unique temp dir), never other Ray instances
on the machine (`ray stop` would stop them all).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalRayCluster:
    """`ray start --head` (+ `ray start --address` per extra node) on loopback."""

    def __init__(self) -> None:
        # short path: Ray's unix sockets live under it and have a ~100-character limit
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tsray", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.gcs_port = self.dashboard_port = 0

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, num_cpus: int, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        """The head node; `env` (added to the cluster's) and `cwd` are its raylet's, so its workers' too."""
        ports = free_ports(9)
        self.gcs_port, self.dashboard_port = ports[0], ports[1]
        self._ray_start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={ports[2]}", f"--temp-dir={self.temp_dir}"], num_cpus, ports[3:],
                        env, cwd)
        self._wait_for_dashboard()

    def add_node(self, num_cpus: int, env: dict[str, str] | None = None, cwd: Path | None = None,
                 ip: str = "127.0.0.1") -> None:
        """One more node; `env` and `cwd` as for `start_head` (e.g. a node-local cache no other node sees). With
        another loopback address as `ip` (127.0.0.2: all of 127/8 is loopback), Ray sees a node of its own
        address, as on a real cluster: it numbers local ranks per node address."""
        self._ray_start([f"--address={self.gcs_address}"], num_cpus, free_ports(6), env, cwd, ip)

    def _ray_start(self, args: list[str], num_cpus: int, ports: list[int], env: dict[str, str] | None = None,
                   cwd: Path | None = None, ip: str = "127.0.0.1") -> None:
        node_ports = [f"--object-manager-port={ports[0]}", f"--node-manager-port={ports[1]}",
                      f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                      f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}"]
        result = subprocess.run([*RAY, "start", *args, *node_ports, f"--node-ip-address={ip}",
                                 f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats"],
                                env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=180)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr}")

    def _wait_for_dashboard(self, timeout_s: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                request = urllib.request.Request(f"{self.dashboard_address}/api/version",
                                                 headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(request, timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError("the Ray dashboard did not come up")

    def processes(self) -> list[psutil.Process]:
        mine = []
        for process in psutil.process_iter(["cmdline"]):
            if any(str(self.temp_dir) in part for part in process.info["cmdline"] or []):
                mine.append(process)
        return mine

    def stop(self) -> None:
        processes = self.processes()
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
