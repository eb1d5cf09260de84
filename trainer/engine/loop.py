"""The training loop of one worker: stream → towers → global objective → DeepSpeed step, with eval and
checkpoint cadences (and an evaluation of the starting model at step 0, unless `eval.at_start` is off).
Rank-0 roles gate only I/O (progress, metrics files, W&B); every rank takes part in every collective,
DeepSpeed's checkpoint save included.

Each step ends with one small all-reduce of two flags, so that every rank takes the same decision at the same
step: whether the step was non-finite on any rank (then it is skipped or the run stops, `optim.nonfinite`) and
whether any rank was asked to stop (SIGTERM/SIGINT, or the launcher's `request_stop`): then every rank saves
the same step's checkpoint and the run ends cleanly, to be resumed later exactly where it stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from trainer import checkpoint
from trainer.checkpoint import RunState
from trainer.config import Config
from trainer.data.preprocess import Preprocessor
from trainer.data.stream import epoch_plan, train_batches
from trainer.engine.cache import cached_step
from trainer.engine.evaluate import evaluate
from trainer.engine.step import embed_batch
from trainer.errors import CheckpointError, NumericalError
from trainer.objectives.objective import MetricObjective
from trainer.progress import Reporter
from trainer.tracking import Tracker

WARMUP_STEPS_EXCLUDED = 3  # steps whose time is not part of steady-state throughput (first batch, op warm-up)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A request to stop at the next step boundary, from a signal handler or the launcher (process-wide)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: the first signal asks for a clean stop; a second one stops at once."""
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.request(signum)

    def install(self) -> bool:
        """Handle SIGTERM and SIGINT in this process; only possible from the main thread (not under Ray)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)
        return True


STOP = StopRequest()


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask this worker to save a checkpoint and stop after its current step (what SIGTERM does)."""
    STOP.request(signum)


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
    """Runs steps until `total_steps` (or an agreed stop), evaluating and checkpointing on the configured cadences."""

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
    stopped_by: int | None = None
    """The signal every rank agreed to stop on, when the run stopped before `total_steps`."""
    last_saved_step: int = -1
    timeline: dict[str, float] = field(default_factory=dict)
    """Wall-clock marks of this process's start-up: loop start, first batch, first step, loop end."""
    preprocessors: dict[str, Preprocessor] | None = None
    """Per view, the model's preprocessing (None: the toy encoders'); training and evaluation use the same."""

    def run(self, state: RunState) -> RunState:
        self.timeline["loop_start"] = time.time()
        if self.reporter is not None:
            self.reporter.start(self.total_steps, state.step)
        state.world_size = self.world_size
        if state.step == 0 and self.cfg.eval.at_start:
            self._evaluate(0)  # the starting model's baseline; a resumed run has it in metrics.jsonl already
        upcoming: Iterator[dict] | None = None
        while state.step < self.total_steps and self.stopped_by is None:
            self._enter_epoch(state)
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
                if state.step >= self.total_steps or self.stopped_by is not None:
                    break
            else:
                state.epoch, state.batches_into_epoch = state.epoch + 1, 0
        upcoming = None  # stops the unused next epoch's loader workers
        self.timeline["loop_end"] = time.time()
        if state.step >= self.total_steps:
            self.stopped_by = None  # a stop asked for during the last step: the run simply finishes
            self._finish(state)
        return state

    def _enter_epoch(self, state: RunState) -> None:
        order = list(epoch_plan(self.cfg.data.train, self.cfg.data, seed=self.cfg.seed, epoch=state.epoch,
                                world_size=self.world_size).order)
        if state.batches_into_epoch and state.shard_order and state.shard_order != order:
            raise CheckpointError(f"{self.cfg.data.train}: the shards differ from those the checkpoint of step "
                                  f"{state.step} was streaming (epoch {state.epoch} order {state.shard_order[:3]}..., "
                                  f"now {order[:3]}...); resume with the same data.train, seed and data settings")
        state.shard_order = order

    def _batches(self, epoch: int, skip: int, start: bool = False) -> Iterator[dict]:
        return train_batches(self.cfg.data.train, self.cfg.data, seed=self.cfg.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, skip_batches=skip, start=start,
                             preprocessors=self.preprocessors)

    def _step(self, batch: dict, state: RunState) -> None:
        started = time.perf_counter()
        dtype = next(self.engine.module.parameters()).dtype
        guard = _GuardedEngine(self.engine, self)
        if self.cfg.optim.feature_cache:
            out = cached_step(self.engine, batch, self.kind, self.device, dtype, self.objective,
                              self.cfg.optim.gradient_accumulation_steps, self.world_size)
        else:
            embedded = embed_batch(self.engine, batch, self.kind, self.device, dtype)
            out = self.objective(embedded.embeddings, embedded.labels, embedded.explicit,
                                 logit_scale=getattr(self.engine.module, "logit_scale", None))
            # Each worker's share sums to the global loss; DeepSpeed averages gradients over workers: scale back.
            self.engine.backward(out.local_share * self.world_size)
        # Both paths end here: the guard sees the loss (with ZeRO 1-2 and the feature cache no gradient is
        # visible before DeepSpeed's own step, so the loss is what catches a NaN batch there).
        guard.loss = out.loss
        guard.step()
        samples = len(batch["keys"]) * self.world_size
        self.throughput.add(samples, time.perf_counter() - started)
        self.corrupt_by_worker[(state.epoch, batch.get("worker", 0))] = batch.get("corrupt", 0)
        state.step += 1
        state.samples_seen += samples
        if guard.skipped:
            self._skip(state, float(out.loss))
        if self.rank == 0:
            self._log(state, out, skipped=guard.skipped)

    def _log(self, state: RunState, out: Any, *, skipped: bool) -> None:
        loss, lr = float(out.loss), float(self.engine.get_lr()[0])
        if self.tracker is not None:
            self.tracker.log_step(state.step, state.epoch, loss, lr, skipped)
        if state.step % self.cfg.log.every_steps == 0 or state.step == 1:
            metrics = {"loss": loss, "lr": lr, "samples_per_s": self.throughput.samples_per_s,
                       "epoch": float(state.epoch), "nonfinite_steps": float(state.nonfinite_steps), **out.stats}
            if self.tracker is not None:
                self.tracker.log({f"train/{k}": v for k, v in metrics.items()}, state.step)
            if self.reporter is not None:
                self.reporter.update(state.step, metrics)

    def _skip(self, state: RunState, loss: float) -> None:
        state.nonfinite_steps += 1
        limit = self.cfg.optim.max_nonfinite_steps
        what = f"step {state.step}: the loss ({loss}) or a gradient is not finite"
        if self.cfg.optim.nonfinite == "stop" or state.nonfinite_steps > limit:
            why = "optim.nonfinite=stop" if self.cfg.optim.nonfinite == "stop" else \
                f"{state.nonfinite_steps} non-finite steps exceed optim.max_nonfinite_steps={limit}"
            latest = checkpoint.latest_checkpoint(self.run_dir)
            raise NumericalError(f"{what}; stopped ({why}) without saving: the newest complete checkpoint is "
                                 f"{latest if latest else 'none'}. Lower optim.lr, check the data for NaN/Inf "
                                 f"values, or raise optim.max_nonfinite_steps")
        if self.reporter is not None:
            self.reporter.message(f"{what}: step skipped (no update), {state.nonfinite_steps} of at most {limit}")

    def _after_step(self, state: RunState) -> None:
        every_eval, every_ckpt = self.cfg.eval.every_steps, self.cfg.checkpoint.every_steps
        last = state.step >= self.total_steps
        if every_eval and state.step % every_eval == 0 and not last:
            self._evaluate(state.step)
        if (every_ckpt and state.step % every_ckpt == 0 and not last) or (self.stopped_by is not None and not last):
            self._save(state)
        if self.stopped_by is not None and self.reporter is not None:
            self.reporter.update(state.step, {})
            self.reporter.message(f"{signal.Signals(self.stopped_by).name}: stopped after step {state.step}, "
                                  f"checkpoint saved; `twinscale resume {self.run_dir}` continues the run")

    def _evaluate(self, step: int) -> None:
        # Every rank embeds its share of the held-out split and scores its share of the queries (collectives
        # inside); all get the same metrics, and rank 0 logs them.
        if self.cfg.data.test is None:
            return
        self.last_eval = evaluate(self.engine.module, self.cfg, self.device, collective=self.objective.collective,
                                  preprocessors=self.preprocessors)
        if self.rank != 0:
            return
        if self.tracker is not None:
            self.tracker.log_eval(self.last_eval, step)
        if self.reporter is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items() if k != "num_queries")
            self.reporter.message(f"step {step}: {shown}")

    def _save(self, state: RunState) -> None:
        if state.step == self.last_saved_step:
            return
        if self.tracker is not None:
            state.tracker_id = self.tracker.run_id
        checkpoint.save(self.engine, self.run_dir, state, self.cfg.checkpoint.keep_last, self.rank,
                        self.objective.memory)
        self.last_saved_step = state.step

    def _finish(self, state: RunState) -> None:
        self._evaluate(state.step)
        self._save(state)
        if self.reporter is not None:
            self.reporter.update(state.step, {"samples_per_s": self.throughput.samples_per_s})

    def agree(self, nonfinite: bool) -> tuple[bool, int | None]:
        """Whether any rank saw a non-finite step, and the stop signal any rank received (one all-reduce, none
        with one worker)."""
        if self.world_size == 1:
            return nonfinite, STOP.signum or None
        flags = self.objective.collective.max(torch.tensor([int(nonfinite), STOP.signum or 0], dtype=torch.int64))
        return bool(flags[0]), int(flags[1]) or None


class _GuardedEngine:
    """The DeepSpeed engine with a guarded `step()`: the ranks agree first (see the module docstring); a
    non-finite step discards its gradients instead of updating. Everything else is the engine's own."""

    def __init__(self, engine: Any, loop: TrainLoop) -> None:
        self._engine, self._loop = engine, loop
        self.loss: torch.Tensor | None = None
        self.skipped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def step(self) -> None:
        engine = self._engine
        nonfinite = (self.loss is not None and not bool(torch.isfinite(self.loss))) or not _gradients_finite(engine)
        self.skipped, stop = self._loop.agree(nonfinite)
        if stop is not None:
            self._loop.stopped_by = stop
        if self.skipped:
            _discard_gradients(engine)
            self._loop.objective.discard_memory()
        else:
            engine.step()
            self._loop.objective.commit_memory()


def _gradients_finite(engine: Any) -> bool:
    """Whether this rank's gradients are finite: on the parameters (ZeRO 0), or this rank's reduced partition
    (ZeRO 1-2, once DeepSpeed holds it: after a managed backward). The ranks then agree on the answer."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    partitions = getattr(engine.optimizer, "averaged_gradients", None)
    if engine.zero_optimization() and isinstance(partitions, dict):
        grads += [g for group in partitions.values() if group is not None for g in group if g is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)))


def _discard_gradients(engine: Any) -> None:
    """Drop this step's gradients without an update, as DeepSpeed does after its own step."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        engine.optimizer.zero_grad()
    engine.zero_grad()
    if hasattr(engine, "_unmanaged_backward_count"):
        engine._unmanaged_backward_count = 0  # the feature cache's backward calls of the discarded step
