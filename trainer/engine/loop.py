"""The training loop of one worker: stream → towers → global objective → DeepSpeed step, with eval and
checkpoint cadences. Rank-0 roles gate only I/O (progress, metrics files, W&B); every rank takes part in
every collective, DeepSpeed's checkpoint save included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.checkpoint import RunState
from trainer.config import Config
from trainer.data.stream import train_batches
from trainer.engine.cache import cached_step
from trainer.engine.evaluate import evaluate
from trainer.engine.step import embed_batch
from trainer.objectives.objective import MetricObjective
from trainer.progress import Reporter
from trainer.tracking import Tracker

WARMUP_STEPS_EXCLUDED = 3  # steps whose time is not part of steady-state throughput (first batch, op warm-up)


@dataclass
class Throughput:
    """Steady-state training throughput: step time only, after the first few steps of this process."""

    samples: int = 0
    seconds: float = 0.0
    steps_timed: int = 0
    steps_seen: int = 0

    def add(self, samples: int, seconds: float) -> None:
        self.steps_seen += 1
        if self.steps_seen > WARMUP_STEPS_EXCLUDED:
            self.samples += samples
            self.seconds += seconds
            self.steps_timed += 1

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainLoop:
    """Runs steps until `total_steps`, evaluating and checkpointing on the configured cadences."""

    cfg: Config
    engine: Any
    objective: MetricObjective
    kind: str
    total_steps: int
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    tracker: Tracker | None
    reporter: Reporter | None
    throughput: Throughput = field(default_factory=Throughput)
    corrupt_by_worker: dict[tuple[int, int], int] = field(default_factory=dict)
    """Corrupt samples skipped, by (epoch, DataLoader worker): each epoch's workers count from zero."""
    last_eval: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)
    """Wall-clock marks of this process's start-up: loop start, first batch, first step, loop end."""

    def run(self, state: RunState) -> RunState:
        self.timeline["loop_start"] = time.time()
        if self.reporter is not None:
            self.reporter.start(self.total_steps, state.step)
        upcoming: Iterator[dict] | None = None
        while state.step < self.total_steps:
            # Resuming inside an epoch skips the batches already consumed: the stream is a function of
            # (seed, epoch, rank, worker) alone.
            batches = upcoming or self._batches(state.epoch, state.batches_into_epoch)
            # The next epoch's loader starts now, so its first batches are ready when this epoch ends (a new
            # loader's workers fill their shuffle buffer first, which would otherwise stall every epoch start).
            upcoming = self._batches(state.epoch + 1, 0, start=True)
            for batch in batches:
                if "first_step" not in self.timeline:
                    self.timeline["first_batch"] = time.time()
                self._step(batch, state)
                self.timeline.setdefault("first_step", time.time())
                state.batches_into_epoch += 1
                self._after_step(state)
                if state.step >= self.total_steps:
                    break
            else:
                state.epoch, state.batches_into_epoch = state.epoch + 1, 0
        upcoming = None  # stops the unused next epoch's loader workers
        self.timeline["loop_end"] = time.time()
        self._finish(state)
        return state

    def _batches(self, epoch: int, skip: int, start: bool = False) -> Iterator[dict]:
        return train_batches(self.cfg.data.train, self.cfg.data, seed=self.cfg.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, skip_batches=skip, start=start)

    def _step(self, batch: dict, state: RunState) -> None:
        started = time.perf_counter()
        dtype = next(self.engine.module.parameters()).dtype
        if self.cfg.optim.feature_cache:
            out = cached_step(self.engine, batch, self.kind, self.device, dtype, self.objective,
                              self.cfg.optim.gradient_accumulation_steps, self.world_size)
        else:
            embedded = embed_batch(self.engine, batch, self.kind, self.device, dtype)
            out = self.objective(embedded.embeddings, embedded.labels, embedded.explicit)
            # Each worker's share sums to the global loss; DeepSpeed averages gradients over workers: scale back.
            self.engine.backward(out.local_share * self.world_size)
            self.engine.step()
        samples = len(batch["keys"]) * self.world_size
        self.throughput.add(samples, time.perf_counter() - started)
        self.corrupt_by_worker[(state.epoch, batch.get("worker", 0))] = batch.get("corrupt", 0)
        state.step += 1
        state.samples_seen += samples
        if self.rank == 0 and (state.step % self.cfg.log.every_steps == 0 or state.step == 1):
            metrics = {"loss": float(out.loss), "lr": float(self.engine.get_lr()[0]),
                       "samples_per_s": self.throughput.samples_per_s, "epoch": float(state.epoch), **out.stats}
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in metrics.items()}, state.step)
            if self.reporter is not None:
                self.reporter.update(state.step, metrics)

    def _after_step(self, state: RunState) -> None:
        every_eval, every_ckpt = self.cfg.eval.every_steps, self.cfg.checkpoint.every_steps
        last = state.step >= self.total_steps
        if every_eval and state.step % every_eval == 0 and not last:
            self._evaluate(state.step)
        if every_ckpt and state.step % every_ckpt == 0 and not last:
            self._save(state)

    def _evaluate(self, step: int) -> None:
        if self.rank != 0 or self.cfg.data.test is None:
            return
        self.last_eval = evaluate(self.engine.module, self.cfg, self.device)
        if self.tracker is not None:
            self.tracker.log_eval(self.last_eval, step)
        if self.reporter is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items() if k != "num_queries")
            self.reporter.message(f"step {step}: {shown}")

    def _save(self, state: RunState) -> None:
        if self.tracker is not None:
            state.tracker_id = self.tracker.run_id
        checkpoint.save(self.engine, self.run_dir, state, self.cfg.checkpoint.keep_last, self.rank,
                        self.objective.memory)

    def _finish(self, state: RunState) -> None:
        self._evaluate(state.step)
        self._save(state)
        if self.reporter is not None:
            self.reporter.update(state.step, {"samples_per_s": self.throughput.samples_per_s})
