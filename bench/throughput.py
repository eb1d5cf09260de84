"""Steady-state training throughput: Twinscale's step path against a bare PyTorch + PML loop, in one run.

    python bench/throughput.py                         # default demo recipe, 1 and 2 workers
    python bench/throughput.py configs/digits_vectors.yaml --workers 1 --repeats 7 --steps 40

For each worker count W, W processes (gloo, ports picked free) build both contenders from the same recipe and
then alternate timed blocks of `--steps` steps, so both see the same machine load:

- twinscale: the training step path of a run — shards streamed by `train_batches` (DataLoader workers as
  configured), the DeepSpeed engine, the global-batch objective (gather with autograd, mining, loss) and the
  step, through `TrainLoop._step` exactly as `TrainLoop.run` calls it (W&B and the progress bar off).
- bare: what a user would write by hand with the same model, batch size, loss, miner, optimizer, clipping and
  torch thread count: the whole training split decoded once into an in-memory tensor, a seeded permutation
  per epoch, `DistributedDataParallel` when W > 1, and pytorch-metric-learning's loss and miner (wrapped in
  PML's `DistributedLossWrapper`/`DistributedMinerWrapper(efficient=True)` when W > 1: local anchors against
  the gathered batch, the same amount of work as Twinscale's exact objective).

Samples/s are wall-clock over a block (waiting for data included), global batch × steps / seconds. CPU µs per
sample (rank 0's process and its DataLoader workers, over its local samples) say what each contender costs
whatever else the machine runs: their ratio is what the throughput ratio becomes when no core is idle. Every
block starts after a barrier; each contender first runs `--warmup` untimed steps. The order of the two
contenders alternates from one repeat to the next; the figure is the median over repeats of each ratio.
Only labeled recipes (digits images or vectors) are supported: the bare loop slices class-labeled tensors.

With `--cached`, Twinscale's contender steps over 8 batches taken from its stream once and held in memory, as the
bare loop's are: the step path alone (engine, objective, guard, optimizer), without the stream.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_config(recipe: Path, overrides: list[str], workers: int, work: Path) -> Any:
    """The recipe with W workers, W&B off and absolute data paths; its shards written under `work` if needed."""
    from launch.cli import absolute_paths, ensure_shards
    from trainer import config

    cwd = Path.cwd()
    os.chdir(work)  # the recipe's relative data paths resolve under the bench's work directory
    try:
        cfg = absolute_paths(config.load(recipe, [*overrides, f"dist.workers={workers}", "log.wandb=false"]))
        ensure_shards(cfg)
    finally:
        os.chdir(cwd)
    return cfg


# --- the bare loop -------------------------------------------------------------------------------------------

def pml_objective(cfg: Any, world_size: int) -> tuple[Any, Any]:
    """PML's loss and miner for the config (wrapped for several workers)."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

    from trainer.objectives.terms import build_distance

    lc, mc = cfg.loss, cfg.mining
    distance = build_distance(lc.distance)
    loss = {
        "contrastive": lambda: losses.ContrastiveLoss(pos_margin=lc.pos_margin, neg_margin=lc.neg_margin,
                                                      distance=distance),
        "triplet": lambda: losses.TripletMarginLoss(margin=lc.margin, distance=distance),
        "multi_similarity": lambda: losses.MultiSimilarityLoss(alpha=lc.alpha, beta=lc.beta, base=lc.base,
                                                               distance=distance),
        "supcon": lambda: losses.SupConLoss(temperature=lc.temperature, distance=distance),
        "infonce": lambda: losses.NTXentLoss(temperature=lc.temperature, distance=distance),
    }[lc.name]()
    miner = {
        "none": lambda: None,
        "batch_hard": lambda: miners.BatchHardMiner(distance=distance),
        "semi_hard": lambda: miners.TripletMarginMiner(margin=mc.margin, type_of_triplets="semihard",
                                                       distance=distance),
        "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=mc.epsilon, distance=distance),
    }[mc.name]()
    if world_size > 1:
        loss = DistributedLossWrapper(loss, efficient=True)
        miner = DistributedMinerWrapper(miner, efficient=True) if miner is not None else None
    return loss, miner


class BareLoop:
    """A hand-written loop on in-memory tensors: the baseline a user could write in an afternoon."""

    def __init__(self, cfg: Any, plan: Any, rank: int, world_size: int) -> None:
        from trainer.data.stream import eval_batches
        from trainer.engine.build import build_run_model

        inputs, labels = [], []
        for batch in eval_batches(cfg.data.train, cfg.data, batch_size=1024):
            inputs.append(batch["views"]["input"])
            labels.append(batch["labels"]["input"])
        self.inputs, self.labels = torch.cat(inputs), torch.cat(labels)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        model = build_run_model(cfg, plan)
        self.model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.loss, self.miner = pml_objective(cfg, world_size)
        self.batches = self._batches()

    def _batches(self) -> Iterator[torch.Tensor]:
        size, per_rank = self.cfg.data.batch_size, self.cfg.data.batch_size * self.world_size
        for epoch in itertools.count():
            order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(order) - per_rank + 1, per_rank):
                yield order[start + self.rank * size:start + (self.rank + 1) * size]

    def step(self) -> None:
        rows = next(self.batches)
        embeddings = self.model(self.inputs[rows], "a")
        labels = self.labels[rows]
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, tuples)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()


# --- Twinscale's step path -----------------------------------------------------------------------------------

class TwinscaleSteps:
    """The engine, objective and stream of a run, stepped through `TrainLoop._step`."""

    def __init__(self, cfg: Any, plan: Any, rank: int, world_size: int, run_dir: Path, cached: bool = False) -> None:
        from trainer.checkpoint import RunState
        from trainer.engine.build import build_run_model
        from trainer.engine.engine import build_engine, resolve_device
        from trainer.engine.loop import TrainLoop
        from trainer.objectives.gather import default_collective
        from trainer.objectives.objective import MetricObjective

        device = resolve_device(cfg)
        engine = build_engine(build_run_model(cfg, plan), cfg, world_size, plan.total_steps, device)
        objective = MetricObjective(cfg.loss, cfg.mining, default_collective())
        self.loop = TrainLoop(cfg, engine, objective, plan.kind, plan.total_steps, run_dir, rank, world_size,
                              device, tracker=None, reporter=None)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.state = RunState()
        self.batches = self._batches()
        self.held: list[dict] = []
        """With `cached`: the stream's first 8 batches, held in memory and cycled (its loaders stopped)."""
        if cached:
            self.held = list(itertools.islice(self.batches, 8))
            self.batches.close()
            self.batches = itertools.cycle(self.held)

    def _batches(self) -> Iterator[dict]:
        # As TrainLoop.run walks the epochs: the next epoch's loader is started when an epoch begins.
        upcoming = None
        for epoch in itertools.count():
            self.state.epoch = epoch
            batches = upcoming or self.loop._batches(epoch, 0)
            upcoming = self.loop._batches(epoch + 1, 0, start=True)
            yield from batches

    def step(self) -> None:
        self.loop._step(next(self.batches), self.state)


# --- the run -------------------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process and of its DataLoader workers, live or finished."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed_block(contender: Any, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this rank and its loader workers) of `steps` steps."""
    dist.barrier()
    started, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        contender.step()
    dist.barrier()
    return time.perf_counter() - started, cpu_seconds() - cpu


def worker(rank: int, world_size: int, port: int, cfg: Any, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import logging
    import multiprocessing

    # A spawned process would spawn its DataLoader workers too (seconds per epoch); Ray and torchrun workers
    # are exec'd processes whose DataLoaders fork, so do the same here.
    multiprocessing.set_start_method("fork", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from trainer.engine.build import plan_run

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    plan = plan_run(cfg, world_size)
    with tempfile.TemporaryDirectory() as run_dir:
        contenders = {"twinscale": TwinscaleSteps(cfg, plan, rank, world_size, Path(run_dir), args.cached),
                      "bare": BareLoop(cfg, plan, rank, world_size)}
        for contender in contenders.values():
            timed_block(contender, args.warmup)
        global_batch = cfg.data.batch_size * world_size
        for repeat in range(args.repeats):
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                seconds, cpu = timed_block(contenders[name], args.steps)
                if rank == 0:
                    local = cfg.data.batch_size * args.steps
                    results.put((world_size, repeat, name, global_batch * args.steps / seconds, cpu / local * 1e6))
    dist.destroy_process_group()


def measure(cfg: Any, world_size: int, args: argparse.Namespace) -> list[tuple[int, int, str, float, float]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(worker, args=(world_size, free_port(), cfg, args, results), nprocs=world_size,
                       start_method="spawn")
    return [results.get(timeout=60) for _ in range(2 * args.repeats)]


def report(rows: list[tuple[int, int, str, float, float]], world_size: int) -> float:
    rate: dict[int, dict[str, float]] = {}
    cpu: dict[int, dict[str, float]] = {}
    for _, repeat, name, samples_per_s, cpu_us in rows:
        rate.setdefault(repeat, {})[name] = samples_per_s
        cpu.setdefault(repeat, {})[name] = cpu_us
    ratios = [r["twinscale"] / r["bare"] for r in rate.values()]
    cpu_ratios = [c["bare"] / c["twinscale"] for c in cpu.values()]
    for repeat in sorted(rate):
        r, c = rate[repeat], cpu[repeat]
        print(f"  workers {world_size}  repeat {repeat}: twinscale {r['twinscale']:7.0f} samples/s "
              f"({c['twinscale']:5.0f} CPU µs/sample)  bare {r['bare']:7.0f} ({c['bare']:5.0f})  "
              f"ratio {r['twinscale'] / r['bare']:.3f}  CPU ratio {c['bare'] / c['twinscale']:.3f}")
    median = statistics.median(ratios)

    def mid(table: dict[int, dict[str, float]], name: str) -> float:
        return statistics.median(t[name] for t in table.values())

    print(f"workers {world_size}: twinscale {mid(rate, 'twinscale'):.0f} samples/s, bare {mid(rate, 'bare'):.0f} "
          f"samples/s (medians); ratio median {median:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
          f"{len(ratios)} repeats)")
    print(f"workers {world_size}: CPU per local sample (rank 0 and its loader workers): twinscale "
          f"{mid(cpu, 'twinscale'):.0f} µs, bare {mid(cpu, 'bare'):.0f} µs; bare/twinscale median "
          f"{statistics.median(cpu_ratios):.3f}")
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per contender before the blocks")
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="where the recipe's shards go")
    parser.add_argument("--cached", action="store_true", help="Twinscale steps over 8 batches held in memory")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"recipe {args.config.name} {' '.join(args.overrides)}")
    for world_size in args.workers:
        cfg = prepare_config(args.config.resolve(), args.overrides, world_size, args.work)
        print(f"workers {world_size}: global batch {cfg.data.batch_size * world_size}, "
              f"{cfg.dist.cpus_per_worker} torch thread(s) each, {cfg.data.loader_workers} loader worker(s) each, "
              f"{args.steps} steps per block{', Twinscale on cached batches' if args.cached else ''}")
        report(measure(cfg, world_size, args), world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
