"""Run `trainer.train.run` on N workers through Ray Train's TorchTrainer (Train V2).

Ray is started for the run on this machine unless an address is given. Workers' own output is not forwarded
(unless verbose): rank 0 sends its progress through a Ray queue and this driver draws the one progress bar.
SIGTERM/SIGINT to the driver reach the workers through a small actor: they save and stop after their current
step. With `dist.max_failures`, Ray restarts a failed worker group and the workers resume the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch import stopping
from trainer import config
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.progress import TIMELINE_FILE, ConsoleProgress, record_timeline
from trainer.remote_runs import fetch_outputs, remote_checkpoints, remote_of

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


def setup_worker_process() -> None:
    """Worker setup hook: quiet logs, and RAY_ADDRESS pinned to this cluster.

    Ray's state API (which Train V2's placement-group cleaner polls to free the workers of a run whose
    controller died, e.g. a Tune trial stopped early) finds its cluster from RAY_ADDRESS, and without it gives up
    when another Ray instance runs on the same machine.
    """
    import ray

    quiet_worker_logs()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


class QueueReporter:
    """Rank 0's reporter under Ray: forwards progress calls to the driver through a Ray queue.

    With `run_dir`, each evaluation's metrics also go to the driver as ("evaluated", (step, metrics)): the loop
    announces an evaluation with `message` right after writing its line to `run_dir/metrics.jsonl`.
    """

    def __init__(self, queue: Any, run_dir: Path | None = None) -> None:
        self.queue = queue
        self.run_dir = run_dir
        self.evaluated_step = -1

    def start(self, total_steps: int, first_step: int) -> None:
        self.queue.put_nowait(("start", (total_steps, first_step)))

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # put_nowait still waits for the queue actor's reply; sending without waiting is not safe: the queue actor
        # is an async actor and runs such calls out of order (an update overtaking "start" or "close" is lost).
        self.queue.put_nowait(("update", (step, metrics)))

    def message(self, text: str) -> None:
        self.queue.put_nowait(("message", (text,)))
        evaluation = None if self.run_dir is None else last_evaluation(self.run_dir)
        if evaluation is not None and evaluation["step"] > self.evaluated_step:
            self.evaluated_step = evaluation["step"]
            self.queue.put_nowait(("evaluated", (evaluation["step"], evaluation)))

    def close(self) -> None:
        self.queue.put_nowait(("close", ()))


def _worker_entry(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs (again, after a restart: then it resumes the newest checkpoint)."""
    import ray.train

    from trainer import train

    quiet_worker_logs()
    if loop_config.get("wandb_group"):
        os.environ["WANDB_RUN_GROUP"] = loop_config["wandb_group"]  # wandb.init reads it: one group per sweep
    cfg = config.from_dict(loop_config["config"], origin="<launched run>")
    rank = ray.train.get_context().get_world_rank()
    reporter = QueueReporter(loop_config["queue"], cfg.run_dir) if rank == 0 else None
    if loop_config.get("stop") is not None:
        stopping.forward_stop(loop_config["stop"])
    resume = loop_config["resume"] or has_checkpoint(cfg.run_dir)  # a restart after a failure
    train.run(cfg, reporter, resume=resume)


def start_ray(address: str | None, verbose: bool, dashboard: bool = False) -> None:
    """Connect to a cluster at `address`, or start a local Ray for this run (with its dashboard if asked: Ray's
    state API lives there, and Train V2 needs it to free the workers of a Tune trial stopped early)."""
    import ray

    env = {**QUIET_ENV, **(LOCAL_RAY_ENV if address is None else {})}
    os.environ.update(env)
    ray.init(
        address=address,
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        include_dashboard=dashboard if address is None else None,
        runtime_env={"env_vars": env, "worker_process_setup_hook": "launch.ray_launch.setup_worker_process"},
    )


def launch(cfg: Config, *, address: str | None = None, resume: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Train `cfg` with `cfg.dist.workers` Ray workers; returns the final metrics written by rank 0."""
    import ray
    from ray.util.queue import Queue

    timeline = {"launch": time.time()}
    start_ray(address, verbose)
    timeline["ray_started"] = time.time()
    try:
        queue, stop = Queue(), stopping.stop_flag_class().remote()
        trainer = build_trainer(cfg, queue, resume=resume, stop=stop)
        progress = ProgressPump(queue)
        progress.start()
        try:
            timeline["fit_start"] = time.time()
            with stopping.DriverSignals(stop) as signals:
                stopping.fit_in_thread(trainer)
            timeline["fit_end"] = time.time()
        finally:
            progress.stop()
    finally:
        ray.shutdown()
    timeline["ray_stopped"] = time.time()
    if signals.signum:
        return stopping.stopped_run(cfg.run_dir, signals.signum)
    url = remote_of(cfg.run_dir)
    if url is not None:  # rank 0 published the outputs from its own node, which need not be this one
        fetch_outputs(url)
    record_timeline(cfg.run_dir, timeline)
    if url is not None:
        from trainer.data import remote

        remote.write_bytes(f"{url}/{TIMELINE_FILE}", (cfg.run_dir / TIMELINE_FILE).read_bytes())
    return read_final_metrics(cfg.run_dir)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether the run has a complete checkpoint to resume from: in its run directory, or for a run on object
    storage there (a worker's node may hold none of it locally), so that every worker decides alike."""
    from trainer.checkpoint import latest_checkpoint

    url = remote_of(run_dir)
    if url is None:
        return latest_checkpoint(run_dir) is not None
    return bool(remote_checkpoints(url)[0])


def ray_storage(cfg: Config) -> tuple[str, Any]:
    """Ray Train's storage path (and filesystem) for a run: its run directory, or for a run on object storage
    `URL/ray` itself (through fsspec), never the driver's local mirror — Ray Train's controller and workers may
    run on other machines, which have no such path. Credentials stay in each process's environment."""
    url = remote_of(cfg.run_dir)
    if url is None:
        return str(cfg.run_dir.resolve()), None
    import pyarrow.fs

    from trainer.data import remote

    fs, path = remote.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: Config, queue: Any, *, resume: bool, wandb_group: str | None = None,
                  stop: Any = None) -> Any:
    """The TorchTrainer of one run on the connected Ray cluster (`launch`, a sweep trial, a submitted job).

    Ray Train's own state goes to `<run_dir>/ray`, so a run's storage path is its run directory: on a multi-node
    cluster, `output_dir` must be a path every node shares, or a URL (`s3://…`: see `ray_storage`).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_cluster_gpus(cfg)
    storage_path, storage_filesystem = ray_storage(cfg)
    use_gpu = cfg.dist.device == "cuda" or (
        cfg.dist.device == "auto" and ray.cluster_resources().get("GPU", 0) >= cfg.dist.workers)
    return TorchTrainer(
        _worker_entry,
        train_loop_config={"config": config.to_dict(cfg), "resume": resume, "queue": queue,
                           "wandb_group": wandb_group, "stop": stop},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.dist.timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.dist.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.dist.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=cfg.dist.max_failures)),
    )


def check_cluster_gpus(cfg: Config) -> None:
    """With `dist.device: cuda`, refuse a cluster that has, and can get, fewer GPUs than workers: Ray would wait
    for them forever. An autoscaling cluster counts the GPUs its node types could add."""
    import ray

    if cfg.dist.device != "cuda":
        return
    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= cfg.dist.workers:
        return
    ceiling = autoscaler_max_gpus()
    if ceiling is not None and ceiling >= cfg.dist.workers:
        return  # the autoscaler starts GPU nodes as the workers ask for them
    raise ConfigError(f"dist.device: cuda needs one GPU per worker ({cfg.dist.workers} workers), but the cluster has "
                      f"{have} GPU(s){'' if ceiling is None else f' and can grow to {ceiling}'}; set dist.device=auto "
                      f"(or cpu), lower dist.workers, or add GPU nodes")


def autoscaler_max_gpus() -> int | None:
    """The most GPUs the cluster's autoscaler could provide (its node types' maximum), or None without one.

    Ray keeps this in the autoscaler's cluster config, read here as Ray Data reads it (a private API: any
    failure means no autoscaler is known)."""
    try:
        from ray._private.state import state

        resources = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return None if resources is None else int(resources.get("GPU", 0))


def last_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The newest line of a run's metrics.jsonl (one JSON object per evaluation, with `step`), if any."""
    import json

    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def read_final_metrics(run_dir: Path) -> dict[str, Any]:
    """The final metrics a finished run wrote."""
    import json

    return json.loads((run_dir / "final_metrics.json").read_text())


class ProgressPump(threading.Thread):
    """Drains the progress queue into the console bar until stopped."""

    def __init__(self, queue: Any, on_evaluated: Callable[[int, dict[str, Any]], None] | None = None,
                 console: bool = True) -> None:
        super().__init__(daemon=True)
        self.queue = queue
        self.on_evaluated = on_evaluated
        self.console = ConsoleProgress() if console else None
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
            if kind == "evaluated":
                if self.on_evaluated is not None:
                    self.on_evaluated(*args)
            elif self.console is not None:
                getattr(self.console, kind)(*args)
        if self.console is not None:
            self.console.close()

    def stop(self, timeout: float = 5) -> None:
        self.stopping.set()
        self.join(timeout=timeout)
