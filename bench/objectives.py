"""Peak memory and time of one step of loss + mining (forward and backward) per worker, as the global batch
grows, for Twinscale's chunked objective and pytorch-metric-learning's DistributedLossWrapper (both modes).

    python bench/objectives.py                       # 1k … 64k, 128-d, 2 gloo processes, all losses
    python bench/objectives.py --sizes 1024 4096 --losses supcon --chunk-entries 4194304

Every measurement runs in two fresh gloo processes (one thread each), so a process's peak resident memory
(ru_maxrss) belongs to that measurement alone: the figure is that peak minus the resident memory just before
the step, i.e. what loss + mining + their backward added, embeddings and labels excluded. Time is given as wall
seconds and as the process's CPU seconds (the larger worker's): on a shared machine the CPU time is the
comparable figure, and the ratios use it. Labels hold 8
samples per class. PML runs are skipped where its (global batch)² (efficient=False) or B_local × B_global
(efficient=True) float32 intermediates would not fit this machine's memory; NTXentLoss (infonce) also builds
a dense mask of positive pairs × negative pairs, which does not fit even at 1k (8 samples per class).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import LossConfig, MiningConfig  # noqa: E402
from trainer.objectives.gather import ProcessGroupCollective  # noqa: E402
from trainer.objectives.objective import MetricObjective  # noqa: E402
from trainer.objectives.terms import build_distance  # noqa: E402

RECIPES = {  # name → (loss config, miner)
    "contrastive": (LossConfig(name="contrastive", distance="cosine", pos_margin=0.9, neg_margin=0.4), "none"),
    "supcon": (LossConfig(name="supcon", temperature=0.1), "none"),
    "infonce": (LossConfig(name="infonce", temperature=0.1), "none"),
    "multi_similarity": (LossConfig(name="multi_similarity"), "multi_similarity"),
}
METHODS = ("twinscale", "pml_full", "pml_efficient")
WORLD = 2
# A PML run is skipped when its largest matrix, times the intermediates PML keeps of that size, would exceed this.
PML_BUDGET_BYTES = 8 * 2**30
PML_MATRICES = 6


def pml_objective(loss_cfg: LossConfig, miner_name: str, efficient: bool):
    """PML's loss and miner, wrapped for data parallelism the way PML documents it."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

    distance = build_distance(loss_cfg.distance)
    loss = {"contrastive": lambda: losses.ContrastiveLoss(pos_margin=loss_cfg.pos_margin,
                                                          neg_margin=loss_cfg.neg_margin, distance=distance),
            "supcon": lambda: losses.SupConLoss(temperature=loss_cfg.temperature, distance=distance),
            "infonce": lambda: losses.NTXentLoss(temperature=loss_cfg.temperature, distance=distance),
            "multi_similarity": lambda: losses.MultiSimilarityLoss(distance=distance)}[loss_cfg.name]()
    wrapped = DistributedLossWrapper(loss, efficient=efficient)
    miner = DistributedMinerWrapper(miners.MultiSimilarityMiner(distance=distance), efficient=efficient) \
        if miner_name == "multi_similarity" else None

    def step(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tuples = miner(embeddings, labels) if miner is not None else None
        return wrapped(embeddings, labels, tuples)

    return step


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, port: int, method: str, recipe: str, global_batch: int, dim: int, chunk: int,
            results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    loss_cfg, miner_name = RECIPES[recipe]
    if method == "twinscale":
        objective = MetricObjective(loss_cfg.model_copy(update={"chunk_entries": chunk}), MiningConfig(name=miner_name),
                                    ProcessGroupCollective())

        def step(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return objective(embeddings, labels).local_share * WORLD
    else:
        step = pml_objective(loss_cfg, miner_name, efficient=method == "pml_efficient")
    step(*_inputs(rank, 64, dim)).backward()  # first calls of kernels and collectives, out of the timing
    embeddings, labels = _inputs(rank, global_batch, dim)
    dist.barrier()
    before = resident_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    step(embeddings, labels).backward()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.put((rank, max(0, peak - before), seconds, cpu_seconds))
    dist.barrier()
    dist.destroy_process_group()


def _inputs(rank: int, global_batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's unit-length embeddings (a leaf with grad) and labels, 8 samples per class on average."""
    gen = torch.Generator().manual_seed(rank)
    local = global_batch // WORLD
    embeddings = torch.nn.functional.normalize(torch.randn(local, dim, generator=gen), dim=1).requires_grad_()
    return embeddings, torch.randint(0, max(2, global_batch // 8), (local,), generator=gen)


def measure(method: str, recipe: str, global_batch: int, dim: int, chunk: int) -> tuple[float, float, float]:
    """(peak MB added per worker, wall seconds per step, CPU seconds per step), the larger of the two workers."""
    results = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, method, recipe, global_batch, dim, chunk, results), nprocs=WORLD,
                       start_method="spawn", join=True)
    rows = [results.get() for _ in range(WORLD)]
    return max(r[1] for r in rows) / 2**20, max(r[2] for r in rows), max(r[3] for r in rows)


def pml_skip_reason(method: str, recipe: str, global_batch: int) -> str | None:
    """Why a PML run would not fit in memory here, or None."""
    rows = global_batch if method == "pml_full" else global_batch // WORLD
    needed = rows * global_batch * 4 * PML_MATRICES
    if recipe == "infonce":  # NTXentLoss: a dense (positive pairs × negative pairs) mask
        needed = (rows * 7) * (rows * (global_batch - 8)) * 4
    if needed > PML_BUDGET_BYTES:
        return f"skipped: needs ~{needed / 2**30:.0f} GB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--losses", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-entries", type=int, default=LossConfig().chunk_entries)
    args = parser.parse_args()
    print(f"{WORLD} gloo processes × 1 thread, {args.dim}-d, chunk_entries {args.chunk_entries}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| loss | global batch | method | peak MB / worker | wall s / step | CPU s / step | memory vs twinscale "
          "| CPU time vs twinscale |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for recipe in args.losses:
        for size in args.sizes:
            ours: tuple[float, float] | None = None
            for method in args.methods:
                skip = pml_skip_reason(method, recipe, size) if method != "twinscale" else None
                if skip:
                    print(f"| {recipe} | {size} | {method} | {skip} | | | | |", flush=True)
                    continue
                memory, seconds, cpu_seconds = measure(method, recipe, size, args.dim, args.chunk_entries)
                if method == "twinscale":
                    ours = (memory, cpu_seconds)
                ratios = f"{memory / ours[0]:.2f}× | {cpu_seconds / ours[1]:.2f}×" \
                    if ours and method != "twinscale" else " | "
                print(f"| {recipe} | {size} | {method} | {memory:.0f} | {seconds:.2f} | {cpu_seconds:.2f} | {ratios} |",
                      flush=True)


if __name__ == "__main__":
    main()
