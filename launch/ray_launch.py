"""Run `trainer.train.run` on N workers through Ray Train's TorchTrainer (Train V2).

Ray is started for the run on this machine unless an address is given. Workers' own output is not forwarded
(unless verbose): rank 0 sends its progress through a Ray queue and this driver draws the one progress bar.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from trainer import config
from trainer.config import Config
from trainer.progress import ConsoleProgress, record_timeline

QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}

# A Ray started for one run serves that run alone: Ray Train's preemption watcher (an extra process polling the
# cluster's nodes) and its metrics export would only take CPU from the training workers.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def quiet_worker_logs() -> None:
    """Worker setup hook: Ray's train loggers and DeepSpeed's at WARNING."""
    for name in ("ray", "ray.train", "ray.data", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class QueueReporter:
    """Rank 0's reporter under Ray: forwards progress calls to the driver through a Ray queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def start(self, total_steps: int, first_step: int) -> None:
        self.queue.put_nowait(("start", (total_steps, first_step)))

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # put_nowait still waits for the queue actor's reply; sending without waiting is not safe: the queue actor
        # is an async actor and runs such calls out of order (an update overtaking "start" or "close" is lost).
        self.queue.put_nowait(("update", (step, metrics)))

    def message(self, text: str) -> None:
        self.queue.put_nowait(("message", (text,)))

    def close(self) -> None:
        self.queue.put_nowait(("close", ()))


def _worker_entry(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    from trainer import train

    quiet_worker_logs()
    cfg = config.from_dict(loop_config["config"], origin="<launched run>")
    rank = ray.train.get_context().get_world_rank()
    reporter = QueueReporter(loop_config["queue"]) if rank == 0 else None
    train.run(cfg, reporter, resume=loop_config["resume"])


def start_ray(address: str | None, verbose: bool) -> None:
    """Connect to a cluster at `address`, or start a local Ray for this run."""
    import ray

    env = {**QUIET_ENV, **(LOCAL_RAY_ENV if address is None else {})}
    os.environ.update(env)
    ray.init(
        address=address,
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        include_dashboard=False if address is None else None,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "launch.ray_launch.quiet_worker_logs"},
    )


def launch(cfg: Config, *, address: str | None = None, resume: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Train `cfg` with `cfg.dist.workers` Ray workers; returns the final metrics written by rank 0."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    timeline = {"launch": time.time()}
    start_ray(address, verbose)
    timeline["ray_started"] = time.time()
    try:
        use_gpu = cfg.dist.device == "cuda" or (
            cfg.dist.device == "auto" and ray.cluster_resources().get("GPU", 0) >= cfg.dist.workers)
        queue = Queue()
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={"config": config.to_dict(cfg), "resume": resume, "queue": queue},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.dist.timeout_s),
            scaling_config=ScalingConfig(num_workers=cfg.dist.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cfg.dist.cpus_per_worker}),
            run_config=RunConfig(name="ray", storage_path=str(cfg.run_dir.resolve())),
        )
        progress = _ProgressPump(queue)
        progress.start()
        try:
            timeline["fit_start"] = time.time()
            trainer.fit()
            timeline["fit_end"] = time.time()
        finally:
            progress.stop()
    finally:
        ray.shutdown()
    timeline["ray_stopped"] = time.time()
    record_timeline(cfg.run_dir, timeline)
    return read_final_metrics(cfg.run_dir)


def read_final_metrics(run_dir: Path) -> dict[str, Any]:
    """The final metrics a finished run wrote."""
    import json

    return json.loads((run_dir / "final_metrics.json").read_text())


class _ProgressPump(threading.Thread):
    """Drains the progress queue into the console bar until stopped."""

    def __init__(self, queue: Any) -> None:
        super().__init__(daemon=True)
        self.queue = queue
        self.console = ConsoleProgress()
        self.stopping = threading.Event()

    def run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                kind, args = self.queue.get(timeout=0.2)
            except Empty:
                if self.stopping.is_set():
                    break
                continue
            except Exception:  # the queue actor is gone: the run is over
                break
            getattr(self.console, kind)(*args)
        self.console.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
