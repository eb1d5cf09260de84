"""Indexing and search: faiss flat vs IVF vs HNSW as `twinscale index` builds them, and a real model's indexing rate.

    python bench/index.py                                   # 200,000 synthetic vectors, 256-d (a few minutes)
    python bench/index.py --items 1000000 --dim 384         # closer to a large corpus
    python bench/index.py --model runs/digits --data data/digits/test --workers 1 2   # plus real indexing

Synthetic corpus: unit vectors around `--clusters` random centres (embeddings of a trained model cluster; uniform
random vectors are the worst case of every approximate index), `--queries` held-out queries drawn the same way.
Each index type is built by `trainer.index.build_faiss` with the CLI's default parameters (IVF: nlist ≈ 4·√N,
nprobe 16; HNSW: M 32, efSearch 128) and measured for build time, search latency (one batch of all queries, and
queries one at a time) and recall@10 against the exact (flat) neighbours; ratios are to flat, in the same run.

Real model (optional): `twinscale index MODEL DATA` through the CLI in a fresh process per worker count (items/s
of the embedding phase, which includes loading the model, and the whole wall time).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def clustered_vectors(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors scattered around `clusters` random unit centres (float32, C-contiguous)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = centres[rng.integers(0, clusters, count)] + rng.standard_normal((count, dim)).astype(np.float32) * 0.06
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def measure(kind: str, corpus: np.ndarray, queries: np.ndarray, k: int) -> dict[str, float | np.ndarray]:
    """Build time, batch and single-query latency and the neighbours of one index type."""
    from trainer.index import IndexSettings, build_faiss

    started = time.perf_counter()
    index, parameters = build_faiss(corpus, IndexSettings(kind))
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    _, found = index.search(queries, k)
    batch_ms = (time.perf_counter() - started) * 1000 / len(queries)
    single = queries[:200]
    started = time.perf_counter()
    for row in single:
        index.search(row[None, :], k)
    single_ms = (time.perf_counter() - started) * 1000 / len(single)
    return {"build_s": build_s, "batch_ms": batch_ms, "single_ms": single_ms, "found": found,
            "parameters": json.dumps(parameters)}


def synthetic(args: argparse.Namespace) -> None:
    corpus = clustered_vectors(args.items, args.dim, args.clusters, seed=0)
    queries = clustered_vectors(args.items + args.queries, args.dim, args.clusters, seed=0)[args.items:]
    print(f"synthetic: {args.items} items, {args.dim}-d, {args.clusters} clusters, {len(queries)} queries, k={args.k}")
    results = {kind: measure(kind, corpus, queries, args.k) for kind in ("flat", "ivf", "hnsw")}
    exact = results["flat"]["found"]
    assert isinstance(exact, np.ndarray)
    flat = results["flat"]
    print(f"{'index':6} {'build s':>8} {'ms/query (batch)':>17} {'ms/query (one)':>15} {'speedup (one)':>14} "
          f"{'recall@10':>10}  parameters")
    for kind, row in results.items():
        found = row["found"]
        assert isinstance(found, np.ndarray)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(exact, found, strict=True)])
        speedup = float(flat["single_ms"]) / float(row["single_ms"])
        print(f"{kind:6} {row['build_s']:8.2f} {row['batch_ms']:17.4f} {row['single_ms']:15.4f} {speedup:14.1f} "
              f"{recall:10.4f}  {row['parameters']}")


def real(args: argparse.Namespace) -> None:
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as work:
            command = [sys.executable, "-m", "launch.cli", "index", args.model, args.data, "--out",
                       str(Path(work) / "index"), "--workers", str(workers), "--part-size", str(args.part_size)]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            rate = re.search(r"([\d.]+) items/s", done.stdout)
            print(f"real model, {workers} worker(s): {rate.group(1) if rate else '?'} items/s embedding, "
                  f"{wall:.1f} s wall (process start, model load, embedding, build) — {done.stdout.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--model", help="a trained run to index --data with (optional)")
    parser.add_argument("--data", help="the corpus for --model")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--part-size", type=int, default=4096)
    args = parser.parse_args()
    synthetic(args)
    if args.model and args.data:
        real(args)


if __name__ == "__main__":
    main()
