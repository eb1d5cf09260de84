"""Time from `twinscale train` to the first training step and to the end of the default demo, broken down.

    python bench/startup.py                   # 3 runs of the default demo through `twinscale train` (Ray)
    python bench/startup.py --torchrun        # alternate with the same recipe under torchrun (no Ray)
    python bench/startup.py --repeats 5 --set optim.max_steps=40

Each run is the real command in a subprocess (`python -m launch.cli train configs/default.yaml`, W&B offline as
by default), in a work directory whose digits shards are written once beforehand (their writing is timed
separately). The breakdown comes from the wall-clock marks the run leaves in runs/<name>/timeline.json (the
driver's: launch, Ray started, fit start/end, Ray stopped; rank 0's: worker start, process group, engine built,
loop start, first batch, first step, loop end, worker end) and from this script's own start and end times.
Targets: first step <= 30 s, whole default demo <= 2 minutes on 2 cores. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# (label, from mark, to mark); "t0" is this script starting the command, "exit" the command ending.
PHASES = [
    ("CLI start: imports, config, shard check, plan", "t0", "launch"),
    ("Ray start (local cluster)", "launch", "ray_started"),
    ("worker start: Ray Train controller, worker actors, process group", "ray_started", "worker_start"),
    ("worker start (torchrun: agent, imports, process group)", "t0", "worker_start"),
    ("DeepSpeed init (model, engine, comm op load)", "process_group", "engine_built"),
    ("run state, W&B start", "engine_built", "loop_start"),
    ("first batch (stream start)", "loop_start", "first_batch"),
    ("first step", "first_batch", "first_step"),
    ("training after the first step (evaluations included)", "first_step", "loop_end"),
    ("final evaluation, checkpoint, export, W&B finish", "loop_end", "worker_end"),
    ("shutdown (Ray Train, Ray) and exit", "worker_end", "exit"),
]


def run_once(work: Path, recipe: Path, overrides: list[str], name: str, torchrun: bool) -> dict[str, float]:
    sets = [arg for override in [*overrides, f"name={name}"] for arg in ("--set", override)]
    if torchrun:
        from throughput import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer.train", str(recipe), *sets]
    else:
        command = [sys.executable, "-m", "launch.cli", "train", str(recipe), *sets]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    result = subprocess.run(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended = time.time()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}")
    run_dir = work / "runs" / name
    marks = json.loads((run_dir / "timeline.json").read_text())
    final = json.loads((run_dir / "final_metrics.json").read_text())
    marks.update(t0=started, exit=ended)
    return {**{key: value - started for key, value in marks.items()}, "samples_per_s": final["train_samples_per_s"],
            "precision_at_1": final.get("precision_at_1", float("nan")), "steps": final["step"]}


def show(label: str, runs: list[dict[str, float]]) -> None:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"{label} ({len(runs)} run(s), medians; seconds):", flush=True)
    for name, start, end in PHASES:
        if name.startswith("worker start (torchrun") and "launch" in runs[0]:
            continue  # a Ray run's worker start is the row above
        if all(start in r and end in r for r in runs):
            print(f"  {name:<68} {median(end) - median(start):7.1f}")
    def each(key: str, digits: int) -> str:
        return ", ".join(f"{r[key]:.{digits}f}" for r in runs)

    print(f"  {'= time to the first step':<68} {median('first_step'):7.1f}   (each run: {each('first_step', 1)})")
    print(f"  {'= whole run':<68} {median('exit'):7.1f}   (each run: {each('exit', 1)})")
    print(f"  steady-state train_samples_per_s {median('samples_per_s'):.0f} (each run: {each('samples_per_s', 0)}); "
          f"precision@1 {median('precision_at_1'):.4f}; {runs[0]['steps']:.0f} steps", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchrun", action="store_true", help="alternate with torchrun runs of the same recipe")
    parser.add_argument("--work", type=Path, default=Path("bench-work/startup"), help="work directory")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)
    from throughput import prepare_config

    started = time.perf_counter()
    prepare_config(args.config.resolve(), args.overrides, 2, work)  # writes the demo's shards once
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; shards ready in "
          f"{time.perf_counter() - started:.1f} s (written on a first run only)")
    results: dict[str, list[dict[str, float]]] = {"twinscale train (Ray)": [], "torchrun": []}
    for repeat in range(args.repeats):
        for label in results:
            if label == "torchrun" and not args.torchrun:
                continue
            run = run_once(work, args.config.resolve(), args.overrides, f"startup-{repeat}-{label[:5]}",
                           torchrun=label == "torchrun")
            results[label].append(run)
            show(f"{label}, run {repeat}", [run])  # each run as it ends, in case later ones are cut short
    for label, runs in results.items():
        if runs:
            show(label, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
