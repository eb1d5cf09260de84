"""The run report at scale: `write_report` of a run whose held-out split has 100,000 items, against `evaluate` on
the same split, and both at 10,000 items, so memory growth can be read as linear in N·D (or not).

    python bench/report_scale.py                          # 10,000 and 100,000 items (about 3 min on 2 cores)
    python bench/report_scale.py --items 10000 100000 --classes 1000 --work /tmp/twinscale-report-bench

Data: synthetic labeled 64-d vectors around `--classes` class centres, written as shards (trainer/data/writer.py).
Model: a seeded, untrained MLP tower (64 → 256 → 64) exported with `export_model`, and synthetic training curves,
in a run directory: no training needed. Each measurement runs in a fresh process, so its peak RSS
(getrusage ru_maxrss) is its own; `imports` is such a process that only imports what the report needs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_run(work: Path, items: int, classes: int) -> Path:
    """A run directory with config.yaml, curves, final metrics and an exported model, holding out `items`."""
    from trainer import config
    from trainer.data.writer import shards_exist, write_shards
    from trainer.models.export import export_model
    from trainer.models.towers import InputSpec, build_model

    shards = work / f"vectors-{items}"
    if not shards_exist(shards):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, classes, items)
        centres = rng.standard_normal((classes, 64))
        inputs = (centres[labels] + 0.8 * rng.standard_normal((items, 64))).astype(np.float32)
        np.savez(work / f"vectors-{items}.npz", inputs=inputs, labels=labels)
        write_shards(str(work / f"vectors-{items}.npz"), "labeled", shards, samples_per_shard=5000)
    run_dir = work / f"run-{items}"
    cfg = config.load(None, [f"data.train={shards}", f"data.test={shards}", "model.encoder=mlp",
                             "model.hidden_dims=[256]", "model.embedding_dim=64", "eval.batch_size=1024",
                             f"name={run_dir.name}", f"output_dir={work}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, run_dir / "config.yaml")
    import torch

    torch.manual_seed(0)
    spec = InputSpec("vector", (64,))
    export_model(build_model(cfg.model, spec).eval(), cfg.model, spec, None, run_dir / "model")
    _write_curves(run_dir)
    return run_dir


def _write_curves(run_dir: Path) -> None:
    steps = [{"step": s, "epoch": s // 100, "loss": 3.0 / (1 + s / 200), "lr": 1e-3 * min(1, s / 50)}
             for s in range(1, 1001)]
    (run_dir / "train_loss.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steps))
    evals = [{"step": s, "precision_at_1": 0.5 + s / 4000, "map_at_r": 0.2 + s / 4000} for s in (0, 500, 1000)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evals))
    (run_dir / "final_metrics.json").write_text(json.dumps({**evals[-1], "epoch": 10}))


def child(task: str, run_dir: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from trainer.embed import evaluate_exported
    from trainer.evaluation import set_search_threads
    from trainer.report import write_report

    torch.set_num_threads(2)
    set_search_threads(2)
    if task == "imports":
        import matplotlib.pyplot  # noqa: F401
        import sklearn.decomposition  # noqa: F401

        return {"wall_s": 0.0, "peak_rss_mb": peak_rss_mb()}
    started = time.perf_counter()
    if task == "report":
        size = write_report(Path(run_dir)).stat().st_size
        return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "html_kb": size / 1024}
    metrics = evaluate_exported(Path(run_dir), None)
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "p_at_1": metrics["precision_at_1"]}


def run_child(task: str, run_dir: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", task, str(run_dir)], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/twinscale-report-bench"))
    parser.add_argument("--child", nargs=2, metavar=("TASK", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    base = run_child("imports", args.work)
    print(f"report vs evaluate, 64-d, {args.classes} classes, MLP tower, 2 threads (fresh process per row; "
          f"imports alone: {base['peak_rss_mb']:.0f} MB)")
    print(f"{'task':>9} {'items':>8} {'wall s':>8} {'peak RSS MB':>12} {'above imports MB':>17}")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for items in args.items:
        run_dir = make_run(args.work, items, args.classes)
        for task in ("report", "evaluate"):
            row = rows[(task, items)] = run_child(task, run_dir)
            if "error" in row:
                print(f"{task:>9} {items:>8} failed: {row['error']}")
                continue
            print(f"{task:>9} {items:>8} {row['wall_s']:>8.1f} {row['peak_rss_mb']:>12.0f} "
                  f"{row['peak_rss_mb'] - base['peak_rss_mb']:>17.0f}")
    _ratios(rows, args.items)


def _ratios(rows: dict[tuple[str, int], dict[str, Any]], items: list[int]) -> None:
    small, large = min(items), max(items)
    for task in ("report", "evaluate"):
        a, b = rows.get((task, small), {}), rows.get((task, large), {})
        if "wall_s" in a and "wall_s" in b and small != large:
            per_item = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (large - small)
            print(f"{task}: {large}/{small} items = {large / small:.0f}× → wall {b['wall_s'] / a['wall_s']:.1f}×; "
                  f"peak RSS +{b['peak_rss_mb'] - a['peak_rss_mb']:.0f} MB = {per_item:.0f} B per extra item "
                  f"(one 64-d float32 embedding: 256 B; an N×N float32 row: {4 * large} B)")
    report, evaluate = rows.get(("report", large), {}), rows.get(("evaluate", large), {})
    if "wall_s" in report and "wall_s" in evaluate:
        print(f"at {large} items: report / evaluate wall {report['wall_s'] / evaluate['wall_s']:.2f}, "
              f"peak RSS {report['peak_rss_mb'] / evaluate['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
