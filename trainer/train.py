"""Worker entry point: one process per GPU or CPU slot, started by Ray Train or torchrun.

Without Ray:  torchrun --nproc_per_node 2 -m trainer.train configs/default.yaml --set optim.epochs=5
(shards must exist; write them with `twinscale shards` first). With Ray: `twinscale train`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint, config, preflight
from trainer.checkpoint import RunState, write_json_atomic
from trainer.config import Config
from trainer.engine.build import build_run_model, plan_run
from trainer.engine.engine import build_engine, init_distributed, master_state_dict, resolve_device
from trainer.engine.loop import STOP, TrainLoop
from trainer.errors import UserError
from trainer.evaluation import set_search_threads
from trainer.models.export import export_model
from trainer.objectives.gather import default_collective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.objective import MetricObjective
from trainer.progress import ConsoleProgress, Reporter, format_table, record_timeline
from trainer.report import report_at_end
from trainer.tracking import rewind_run_files, start_tracker


def run(cfg: Config, reporter: Reporter | None = None, resume: bool = False) -> dict[str, Any] | None:
    """Train one run on this worker; rank 0 returns the final metrics (or, when stopped by a signal, where it
    stopped), other ranks None."""
    started = time.time()
    STOP.install()
    init_distributed(cfg)
    joined = time.time()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    preflight.check_worker_paths(cfg, rank)  # data and run dir on this node, before any heavy work
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    set_search_threads(cfg.dist.cpus_per_worker)
    device = resolve_device(cfg)
    plan = plan_run(cfg, world, check_model=False)  # the model is built, and so checked, once: below
    engine = build_engine(build_run_model(cfg, plan), cfg, world, plan.total_steps, device)
    engine_built = time.time()
    memory = MemoryBank(cfg.mining.memory_size, cfg.mining.memory_start_step) if cfg.mining.memory_size else None
    objective = MetricObjective(cfg.loss, cfg.mining, default_collective(), memory)
    run_dir = cfg.run_dir
    state = checkpoint.load(engine, run_dir, rank, world, memory) if resume else RunState()
    tracker = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, run_dir / "config.yaml")
        rewind_run_files(run_dir, state.step)
        tracker = start_tracker(cfg.log, run_dir, config.to_dict(cfg), state.tracker_id)
    if resume:  # last, so that nothing after it (W&B's start) moves a stream the uninterrupted run did not
        resume_rng(checkpoint.rng_path(checkpoint.checkpoint_path(run_dir, state.step), rank),
                   reporter if rank == 0 else None)
    loop = TrainLoop(cfg, engine, objective, plan.kind, plan.total_steps, run_dir, rank, world, device, tracker,
                     reporter if rank == 0 else None, preprocessors=plan.preprocessors)
    if resume and loop.reporter is not None:
        loop.reporter.message(f"resumed from {checkpoint.checkpoint_path(run_dir, state.step)} (step {state.step}, "
                              f"epoch {state.epoch}, {state.batches_into_epoch} batches into it)")
    state = loop.run(state)
    corrupt = torch.tensor([sum(loop.corrupt_by_worker.values())], dtype=torch.long)
    total_corrupt = int(default_collective().sum(corrupt))
    # The fp32 master weights, not the module's (bf16 on GPU); assembling ZeRO partitions is collective.
    weights = master_state_dict(engine) if loop.stopped_by is None else None
    if rank != 0:
        return None
    assert tracker is not None
    if loop.stopped_by is not None:
        stopped = {"stopped_by": signal.Signals(loop.stopped_by).name, "step": state.step,
                   "checkpoint": str(checkpoint.checkpoint_path(run_dir, state.step))}
        tracker.finish({"stopped_at_step": state.step})
        return stopped
    assert weights is not None
    export_model(weights, cfg.model, plan.spec_a, plan.spec_b, run_dir / "model",
                 extra={"text_buckets": cfg.data.text_buckets, "text_ngrams": list(cfg.data.text_ngrams)},
                 preprocessors=plan.preprocessors)
    final = {**loop.last_eval, "step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
             "train_samples_per_s": loop.throughput.samples_per_s, "corrupt_samples_skipped": total_corrupt,
             "nonfinite_steps_skipped": state.nonfinite_steps, "wall_s": time.time() - started}
    write_json_atomic(run_dir / "final_metrics.json", final)
    record_timeline(run_dir, {"worker_start": started, "process_group": joined, "engine_built": engine_built,
                              **loop.timeline, "worker_end": time.time()})
    if cfg.report.enabled:  # before publishing, so that a remote run's report.html is uploaded with the rest
        report_at_end(run_dir, tracker, state.step)
    checkpoint.publish_outputs(run_dir)  # a remote output_dir: final metrics, model and logs to object storage
    tracker.finish(final)
    if reporter is not None:
        reporter.close()
    return final


def resume_rng(path: Path, reporter: Reporter | None) -> None:
    """Restore this rank's RNG streams; a checkpoint of an older Twinscale has none: resume, but not bitwise."""
    if path.is_file():
        checkpoint.restore_rng(path)
    elif reporter is not None:
        reporter.message(f"{path.parent}: no RNG state ({path.name}); the resumed run continues with fresh random "
                         f"streams, so it will not match an uninterrupted run bit for bit")


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.train [CONFIG] [--set k=v ...] [--resume]`, e.g. under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__)
    parser.add_argument("config", nargs="?", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        is_rank0 = int(os.environ.get("RANK", "0")) == 0
        final = run(cfg, ConsoleProgress() if is_rank0 else None, resume=args.resume)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if final is not None:
        print(format_table(final))
    if STOP.signum is not None and (final is None or "stopped_by" in final):
        return 128 + STOP.signum  # stopped cleanly by a signal, as a scheduler expects; resume continues it
    return 0


if __name__ == "__main__":
    sys.exit(main())
