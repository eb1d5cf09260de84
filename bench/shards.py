"""Peak memory and time of `twinscale shards` on a large table of text pairs, this checkout against an older writer
(the one that read every record into a list), run one after the other in fresh processes on the same file.

    python bench/shards.py                          # 2,000,000 pairs, baseline a0fef85~1 (before streaming)
    python bench/shards.py --pairs 200000 --workers 1 2
    python bench/shards.py --baseline none          # this checkout only

The table is JSONL `anchor,positive` (about 40 characters per text), written once under --work. Each contender is
`twinscale shards TABLE --kind pairs --test-fraction 0.1 --samples-per-shard 1000` in a child process. Memory:
the child's own peak (ru_maxrss from os.wait4) and the peak of its whole process tree (the writer, the forkserver
and the pool workers, resident memory summed, sampled every 50 ms with psutil). The baseline
runs from `git archive REF trainer launch` unpacked under --work, so nothing in the checkout changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RUN = "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))"


def write_table(path: Path, pairs: int) -> None:
    """`pairs` similar pairs, deterministic text, streamed to disk."""
    with path.open("w") as out:
        for i in range(pairs):
            out.write(json.dumps({"anchor": f"how do I configure item {i} of the cluster {i % 977}?",
                                  "positive": f"item {i} is configured in section {i % 131} of the manual"}) + "\n")


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of `process` and all its descendants (0 once it has exited)."""
    total = 0
    try:
        for member in [process, *process.children(recursive=True)]:
            total += member.memory_info().rss
    except psutil.Error:
        pass
    return total


def measure(code_root: Path, table: Path, out: Path, workers: int | None) -> tuple[float, float, float]:
    """(peak RSS of the writer process, peak RSS of its process tree, both MiB; seconds) of one run."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", RUN, "shards", str(table), "--kind", "pairs", "--out", str(out),
               "--test-fraction", "0.1", "--samples-per-shard", "1000"]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=code_root, env=env, stdout=subprocess.DEVNULL)
    watched, tree_peak = psutil.Process(process.pid), 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss(watched))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command}: exit {process.returncode}")
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_maxrss / 1024, tree_peak / 2**20, seconds


def baseline_tree(ref: str, work: Path) -> Path:
    root = work / f"baseline-{ref.replace('/', '_').replace('~', '_')}"
    if not root.exists():
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "trainer", "launch"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--baseline", default="a0fef85~1", help="git ref of the older writer, or none")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers values for this checkout")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "twinscale-bench-shards")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    table = args.work / f"pairs-{args.pairs}.jsonl"
    if not table.exists():
        started = time.perf_counter()
        write_table(table, args.pairs)
        print(f"wrote {table} ({table.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    contenders: list[tuple[str, Path, int | None]] = []
    if args.baseline != "none":
        contenders.append((f"baseline {args.baseline}", baseline_tree(args.baseline, args.work), None))
    contenders += [(f"this checkout, --workers {n}", REPO, n) for n in args.workers]
    print(f"{args.pairs} pairs, --test-fraction 0.1, 1000 samples per shard")
    print(f"{'writer':<32} {'peak RSS MiB':>12} {'tree MiB':>9} {'seconds':>8} {'pairs/s':>9}")
    for name, root, workers in contenders:
        rss, tree, seconds = measure(root, table, args.work / "out", workers)
        print(f"{name:<32} {rss:>12.0f} {tree:>9.0f} {seconds:>8.1f} {args.pairs / seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
