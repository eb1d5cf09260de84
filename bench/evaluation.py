"""Held-out evaluation at scale: the blocked faiss k-NN metrics against the PML path they replaced, and the
embedding of a 100,000-item split by 1 and 2 workers.

    python bench/evaluation.py                       # all parts (about 10 min on 2 shared cores)
    python bench/evaluation.py --parts metrics       # metrics only; --parts embed: embedding only
    python bench/evaluation.py --items 100000 --old-items 10000 --classes 1000 10 --work /tmp/twinscale-bench

Metrics: synthetic unit vectors (64-d, around class centres, classes of equal expected size) scored by
`retrieval_metrics` (every item queries all others) at `--items`, and by the previous path (PML's
AccuracyCalculator over one N × k neighbour matrix, k the largest class) at `--old-items`, which it can handle;
the new path is also run at `--old-items` for a ratio on the same data. Each measurement runs in a fresh
process, so its peak RSS is its own.

Embedding: `--items` digits-like labeled vectors (the 8×8 digits, 64 values, with noise) written as shards,
evaluated through a small MLP tower by `trainer.engine.evaluate.evaluate` with 1 process, then 2 gloo
processes (each with half the cores): wall time of the whole evaluation (embed + gather + k-NN) and the
largest peak RSS of one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic(items: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit 64-d vectors around `classes` random centres (noise 0.15 per dimension), labels uniform."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (items,), generator=generator)
    centres = torch.nn.functional.normalize(torch.randn(classes, 64, generator=generator), dim=1)
    noisy = centres[labels] + 0.15 * torch.randn(items, 64, generator=generator)
    return torch.nn.functional.normalize(noisy, dim=1), labels


def old_retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, recall_k: int) -> dict[str, float]:
    """The replaced path: PML's AccuracyCalculator with a faiss k-NN of every item at once."""
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    class Calculator(AccuracyCalculator):
        def determine_k(self, bin_counts: torch.Tensor, num_reference_embeddings: int,
                        ref_includes_query: bool) -> int:
            return int(self.k)

    _, dense, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    calculator = Calculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                            k=min(max(int(counts.max()), recall_k), len(labels) - 1), device=torch.device("cpu"),
                            knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
    return {k: float(v) for k, v in calculator.get_accuracy(embeddings, dense, ref_includes_query=True).items()}


def child_metrics(path: str, items: int, classes: int) -> dict[str, Any]:
    from trainer.evaluation import retrieval_metrics

    embeddings, labels = synthetic(items, classes)
    before = peak_rss_mb()
    started = time.perf_counter()
    metrics = retrieval_metrics(embeddings, labels) if path == "new" else old_retrieval_metrics(embeddings, labels, 10)
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
            "map_at_r": metrics.get("map_at_r", metrics.get("mean_average_precision_at_r"))}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(*arguments: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_metrics(items: int, old_items: int, classes: list[int]) -> None:
    print("metrics: every item queries all others, 64-d, recall_k 10 (fresh process per row)")
    print(f"{'path':>5} {'items':>8} {'classes':>8} {'wall s':>8} {'peak RSS MB':>12} {'MAP@R':>7}")
    for count in classes:
        rows = {(path, n): run_child("metrics", path, str(n), str(count))
                for path, n in (("old", old_items), ("new", old_items), ("new", items))}
        for (path, n), row in rows.items():
            if "error" in row:
                print(f"{path:>5} {n:>8} {count:>8} failed: {row['error']}")
                continue
            print(f"{path:>5} {n:>8} {count:>8} {row['wall_s']:>8.1f} {row['peak_rss_mb']:>12.0f} "
                  f"{row['map_at_r']:>7.4f}")
        old, new = rows[("old", old_items)], rows[("new", old_items)]
        if "error" not in old and "error" not in new:
            print(f"      at {old_items} items, {count} classes: new/old wall {new['wall_s'] / old['wall_s']:.2f}, "
                  f"peak RSS {new['peak_rss_mb'] / old['peak_rss_mb']:.2f}")


class SmallTower(torch.nn.Module):
    """An MLP tower (64 → 256 → 64, unit outputs), the size of the digits vectors recipe's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))

    def forward(self, inputs: torch.Tensor, side: str) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net(inputs.flatten(1)), dim=1)


def write_digits_like(directory: Path, items: int) -> None:
    from sklearn.datasets import load_digits

    from trainer.data.writer import shards_exist, write_shards

    if shards_exist(directory):
        return
    digits = load_digits()
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(digits.target), items)
    inputs = (digits.data[picks] / 16 + 0.05 * rng.standard_normal((items, 64))).astype(np.float32)
    source = directory.parent / f"digits-like-{items}.npz"
    np.savez(source, inputs=inputs, labels=digits.target[picks])
    write_shards(str(source), "labeled", directory, samples_per_shard=5000)


def child_embed(shards: str, world: int, rank: int, port: int) -> dict[str, Any]:
    import faiss
    import torch.distributed as dist

    from trainer import config
    from trainer.engine.evaluate import evaluate
    from trainer.objectives.gather import default_collective

    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, cfg = SmallTower(), config.load(None, ["eval.batch_size=1024"])
    collective = default_collective()
    collective.barrier()
    started = time.perf_counter()
    metrics = evaluate(model, cfg, torch.device("cpu"), shards, collective)
    wall = time.perf_counter() - started
    collective.barrier()
    if world > 1:
        dist.destroy_process_group()
    return {"wall_s": wall, "peak_rss_mb": peak_rss_mb(), "map_at_r": metrics["map_at_r"]}


def bench_embed(items: int, work: Path) -> None:
    shards = work / f"digits-like-{items}"
    started = time.perf_counter()
    write_digits_like(shards, items)
    print(f"embedding: {items} digits-like items (shards ready in {time.perf_counter() - started:.0f} s), "
          f"MLP tower, whole evaluate() per worker")
    print(f"{'workers':>8} {'wall s':>8} {'peak RSS MB (max worker)':>25} {'MAP@R':>7}")
    walls = {}
    for world in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        processes = [subprocess.Popen([sys.executable, __file__, "--child", "embed", str(shards), str(world),
                                       str(rank), str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
                     for rank in range(world)]
        rows = [json.loads(process.communicate()[0].strip().splitlines()[-1]) for process in processes]
        walls[world] = max(row["wall_s"] for row in rows)
        print(f"{world:>8} {walls[world]:>8.1f} {max(row['peak_rss_mb'] for row in rows):>25.0f} "
              f"{rows[0]['map_at_r']:>7.4f}")
    print(f"      2 workers / 1 worker wall: {walls[2] / walls[1]:.2f} (both on the same {os.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--old-items", type=int, default=10_000)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 10])
    parser.add_argument("--parts", nargs="+", choices=["metrics", "embed"], default=["metrics", "embed"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "twinscale-bench-evaluation")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        row = child_metrics(rest[0], int(rest[1]), int(rest[2])) if kind == "metrics" else \
            child_embed(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(row))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "metrics" in args.parts:
        bench_metrics(args.items, args.old_items, args.classes)
    if "embed" in args.parts:
        args.work.mkdir(parents=True, exist_ok=True)
        bench_embed(args.items, args.work)


if __name__ == "__main__":
    main()
