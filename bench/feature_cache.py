"""Step time of the feature cache (GradCache) against a plain step, at a batch that fits without the cache.

    python bench/feature_cache.py                                   # default recipe (CNN, digits images)
    python bench/feature_cache.py --config configs/digits_vectors.yaml --batch-size 512 --micro-batches 8

One process (a one-rank gloo group), the real DeepSpeed engine and the recipe's model, loss and miner; one
batch read from the recipe's shards is reused for every step, so only the step is timed. Plain and cached
steps alternate (after warm-up steps of each), and the medians are compared, as wall time and as the process's
CPU time (the comparable figure on a shared machine). The cache costs one extra forward
pass without autograd per step, so the ratio is bounded by about (2 forward + 1 backward) / (1 forward + 1
backward) plus the loss, which is computed once either way.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import config  # noqa: E402
from trainer.data.stream import train_batches  # noqa: E402
from trainer.data.writer import shards_exist, write_shards  # noqa: E402
from trainer.engine.build import build_run_model, plan_run  # noqa: E402
from trainer.engine.cache import cached_step  # noqa: E402
from trainer.engine.engine import build_engine  # noqa: E402
from trainer.engine.step import embed_batch  # noqa: E402
from trainer.objectives.gather import Collective  # noqa: E402
from trainer.objectives.objective import MetricObjective  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as sock:  # a free port: other runs may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(args.threads)
    plain_cfg = config.load(args.config, [f"data.batch_size={args.batch_size}", "log.wandb=false"])
    if plain_cfg.data.source and not shards_exist(plain_cfg.data.train):
        write_shards(plain_cfg.data.source, "labeled", Path(plain_cfg.data.train).parent, test_fraction=0.4,
                     as_images=plain_cfg.data.source_as_images)
    cached_cfg = config.load(args.config, [f"data.batch_size={args.batch_size}", "optim.feature_cache=true",
                                           f"optim.gradient_accumulation_steps={args.micro_batches}"])
    plan = plan_run(plain_cfg, 1)
    device = torch.device("cpu")
    batch = next(iter(train_batches(plain_cfg.data.train, plain_cfg.data, seed=0, epoch=0, rank=0, world_size=1)))
    engines = {name: build_engine(build_run_model(cfg, plan), cfg, 1, 10**6, device)
               for name, cfg in (("plain", plain_cfg), ("cached", cached_cfg))}
    objective = MetricObjective(plain_cfg.loss, plain_cfg.mining, Collective())

    def plain() -> None:
        engine = engines["plain"]
        embedded = embed_batch(engine, batch, plan.kind, device, torch.float32)
        engine.backward(objective(embedded.embeddings, embedded.labels, embedded.explicit).local_share)
        engine.step()

    def cached() -> None:
        cached_step(engines["cached"], batch, plan.kind, device, torch.float32, objective, args.micro_batches, 1)
        engines["cached"].step()

    wall: dict[str, list[float]] = {"plain": [], "cached": []}
    cpu: dict[str, list[float]] = {"plain": [], "cached": []}
    for step in range(args.steps + 3):
        for name, run in (("plain", plain), ("cached", cached)):
            started, cpu_started = time.perf_counter(), time.process_time()
            run()
            if step >= 3:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
    print(f"{args.config}: batch {args.batch_size}, {args.micro_batches} micro-batches, {args.threads} threads, "
          f"{args.steps} alternating steps each (medians)")
    print("| step | wall s | CPU s | samples/s (wall) |\n|---|---:|---:|---:|")
    for name, label in (("plain", "plain"), ("cached", "feature cache")):
        wall_s, cpu_s = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {label} | {wall_s:.4f} | {cpu_s:.4f} | {args.batch_size / wall_s:.0f} |")
    wall_ratio = statistics.median(wall["cached"]) / statistics.median(wall["plain"])
    cpu_ratio = statistics.median(cpu["cached"]) / statistics.median(cpu["plain"])
    print(f"feature cache / plain step: {wall_ratio:.2f}× wall, {cpu_ratio:.2f}× CPU time (target ≤ 1.4×)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
