"""Checkpoints and the state contract of a run.

Layout: `<run_dir>/checkpoints/step_00000120/` holds every rank's DeepSpeed files (model, optimizer, schedule),
every rank's RNG states (`rng_rank_00000.safetensors`), the cross-batch memory (`memory.safetensors`, identical on
every rank, written by rank 0) when it is on, and `run_state.json` (step, epoch, stream position, counters).

A save is atomic: every rank writes into `checkpoints/.staging-step_00000120/`; the ranks then agree (one
all-reduce) that every write succeeded; only then rank 0 writes `run_state.json` and renames the directory to
`step_00000120`. A crash, a kill or a full disk during a save therefore leaves at most a staging directory,
which is never resumed from and is removed by the next save; the previous checkpoint stays the newest complete
one. Only complete checkpoints count towards `keep_last`, and older ones are pruned only after the new one is
in place. With a URL as output_dir the complete checkpoint is then published to object storage, its
run_state.json last (trainer.remote_runs), and a resume fetches the newest complete one. Nothing here
unpickles: run state is JSON, RNG states and the memory bank are safetensors, and DeepSpeed files load with
`weights_only=True` (engine.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from trainer.errors import CheckpointError, DataError
from trainer.objectives.gather import default_collective
from trainer.objectives.memory import MemoryBank
from trainer.remote_runs import fetch_run, finish_checkpoint, remote_of, upload_files, upload_outputs

STATE_FILE = "run_state.json"
MEMORY_FILE = "memory.safetensors"
STAGING_PREFIX = ".staging-"


@dataclass
class RunState:
    """Everything besides DeepSpeed's own state that a resumed run needs (saved as JSON by rank 0)."""

    step: int = 0
    """Optimizer steps taken (skipped non-finite steps included)."""
    epoch: int = 0
    """Epoch the next step belongs to."""
    batches_into_epoch: int = 0
    """Batches of `epoch` already consumed on every rank: the stream position within the epoch."""
    shard_order: list[str] = field(default_factory=list)
    """The shard files of `epoch` in their shuffled order; a resume checks that the shards still give it."""
    world_size: int = 0
    """Workers that wrote the checkpoint; the stream is split by rank, so an exact resume needs as many."""
    samples_seen: int = 0
    """Training samples consumed over all workers."""
    nonfinite_steps: int = 0
    """Steps skipped so far because the loss or a gradient was NaN or infinite."""
    tracker_id: str | None = None
    """W&B run id, so a resumed run logs into the same W&B run."""

    @classmethod
    def from_json(cls, path: Path) -> RunState:
        try:
            raw = json.loads(path.read_text())
            return cls(**{key: raw[key] for key in raw if key in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: unreadable run state ({error})") from None


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging directories never count)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file())


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The directory of the checkpoint of `step`."""
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(engine: Any, run_dir: Path, state: RunState, keep_last: int, rank: int,
         memory: MemoryBank | None = None) -> Path:
    """Save on every rank (DeepSpeed's save is collective) into a staging directory, then publish it atomically.

    Raises CheckpointError on every rank when any rank failed to write (a full disk, a lost mount): the run
    stops with the previous checkpoint intact instead of training on without one.
    """
    root, target = checkpoints_dir(run_dir), checkpoint_path(run_dir, state.step)
    staging = root / f"{STAGING_PREFIX}{target.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{STAGING_PREFIX}*"):  # from a save that crashed
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    failure = _write_rank_files(engine, staging, rank, memory)
    failed_ranks = _ranks_failing(failure is not None)
    if failed_ranks:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        reason = f": {failure}" if failure else f" on rank(s) {', '.join(map(str, failed_ranks))}"
        raise CheckpointError(f"{target}: checkpoint could not be written{reason}; the newest complete checkpoint "
                              f"is {previous if previous else 'none'} (resume from it once the storage is fixed)")
    url = remote_of(run_dir)
    if url is not None:  # every node uploads the files its ranks wrote, before the checkpoint is marked complete
        uploaded = _remote_step(lambda: upload_files(staging, url, target.name)) if _local_rank(rank) == 0 else None
        if _ranks_failing(uploaded is not None):
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"{target}: not published to {url} ({uploaded or 'on another node'}); the newest "
                                  f"complete checkpoint there is unchanged; fix the storage or credentials and resume")
    published: str | None = None
    if rank == 0:
        write_json_atomic(staging / STATE_FILE, asdict(state))
        _publish(staging, target)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if url is not None:
            published = _remote_step(lambda: _finish_remote(run_dir, target, url, keep_last))
    if _ranks_failing(published is not None):  # also the barrier that ends the save on every rank
        raise CheckpointError(f"{target}: saved here but not published to {url} ({published or 'see rank 0'}); "
                              f"fix the storage or credentials and resume")
    if url is not None and rank != 0 and _local_rank(rank) == 0:
        shutil.rmtree(staging, ignore_errors=True)  # another node's copy: published, never renamed here
    return target


def _finish_remote(run_dir: Path, target: Path, url: str, keep_last: int) -> None:
    upload_outputs(run_dir, url)
    finish_checkpoint(target, url, keep_last)


def _local_rank(rank: int) -> int:
    return int(os.environ.get("LOCAL_RANK", rank))


def _remote_step(step: Callable[[], object]) -> str | None:
    """Run one upload step of a remote checkpoint; what failed, instead of raising (ranks stay in step)."""
    try:
        step()
    except (DataError, OSError) as error:
        return str(error)
    return None


def publish_outputs(run_dir: Path) -> None:
    """At the end of a run with a remote output_dir: upload final_metrics.json, model/ and the logs (rank 0)."""
    url = remote_of(run_dir)
    if url is not None:
        try:
            upload_outputs(run_dir, url)
        except (DataError, OSError) as error:
            raise CheckpointError(f"{run_dir}: outputs not published to {url} ({error})") from None


def _write_rank_files(engine: Any, staging: Path, rank: int, memory: MemoryBank | None) -> str | None:
    """This rank's share of a checkpoint; returns what went wrong instead of raising, so ranks stay in step."""
    writer = engine.checkpoint_engine
    writer.write_error = None  # DeepSpeed's save stays collective: the checkpoint engine records, never raises
    engine.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)
    if writer.write_error is not None:
        return str(writer.write_error)
    try:
        tensors, metadata = capture_rng()
        save_file(tensors, rng_path(staging, rank), metadata=metadata)
        if rank == 0 and memory is not None:
            save_file(memory.state_dict(), staging / MEMORY_FILE)
    except (OSError, SafetensorError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished staging directory into place (replacing an older save of the same step)."""
    _fsync_tree(staging)
    if target.exists():
        replaced = target.with_name(f"{STAGING_PREFIX}replaced-{target.name}")
        os.replace(target, replaced)
        os.replace(staging, target)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync_dir(target.parent)


def load(engine: Any, run_dir: Path, rank: int, world_size: int, memory: MemoryBank | None = None) -> RunState:
    """Restore DeepSpeed state and the memory bank from the newest complete checkpoint; return its run state.

    The RNG streams are restored separately (`restore_rng`), right before the first step. A run whose output_dir
    is a URL first brings its newest complete remote checkpoint here (one process per node downloads)."""
    _fetch_remote(run_dir, rank)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from under {checkpoints_dir(run_dir)}")
    state = RunState.from_json(found / STATE_FILE)
    if state.world_size and state.world_size != world_size:
        raise CheckpointError(f"{found}: written by {state.world_size} workers, but this run has {world_size}; "
                              f"the data stream is split by rank, so resume with dist.workers={state.world_size}")
    loaded, _ = engine.load_checkpoint(str(found.parent), tag=found.name, load_module_strict=True)
    if loaded is None:
        raise CheckpointError(f"{found}: DeepSpeed could not load this checkpoint")
    if memory is not None:
        load_memory(memory, found / MEMORY_FILE)
    return state


def _fetch_remote(run_dir: Path, rank: int) -> None:
    url = remote_of(run_dir)
    if url is None:
        return
    failure = None
    if _local_rank(rank) == 0:
        try:
            fetch_run(url)
        except (DataError, CheckpointError, OSError) as error:
            failure = str(error)
    if _ranks_failing(failure is not None):
        raise CheckpointError(failure or f"{url}: another rank could not fetch the newest checkpoint")


def load_memory(memory: MemoryBank, path: Path) -> None:
    """Restore the cross-batch memory saved with a checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {MEMORY_FILE}; this checkpoint was saved without "
                              f"mining.memory_size, so it cannot resume a run that uses the memory")
    try:
        memory.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable memory bank ({error})") from None


# --- RNG streams: torch (CPU and the worker's GPU), numpy's global generator and Python's `random`. ---

def rng_path(checkpoint: Path, rank: int) -> Path:
    """Where rank `rank` keeps its RNG states inside a checkpoint."""
    return checkpoint / f"rng_rank_{rank:05d}.safetensors"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors plus string metadata (a safetensors file, never a pickle)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python": torch.tensor(python_state, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    metadata = {"numpy_position": str(position), "numpy_has_gauss": str(has_gauss),
                "numpy_cached_gaussian": repr(float(cached_gaussian)), "python_version": str(version),
                "python_gauss_next": repr(gauss_next)}
    return tensors, metadata


def restore_rng(path: Path) -> None:
    """Put this process's RNGs back to the states `capture_rng` saved at `path`."""
    try:
        with safe_open(str(path), framework="pt") as saved:
            tensors = {key: saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118 (not a dict)
            meta = saved.metadata() or {}
        gauss_next = None if meta["python_gauss_next"] == "None" else float(meta["python_gauss_next"])
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
        np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32),
                             int(meta["numpy_position"]), int(meta["numpy_has_gauss"]),
                             float(meta["numpy_cached_gaussian"])))
        random.setstate((int(meta["python_version"]), tuple(int(v) for v in tensors["python"].tolist()),
                         gauss_next))
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable RNG state ({type(error).__name__}: {error})") from None


# --- Agreement of the save protocol (through the run's one collective helper; no-ops with one process). ---

def _barrier() -> None:
    default_collective().barrier()


def _ranks_failing(failed: bool) -> list[int]:
    """The ranks that report a failure; every rank gets the same answer."""
    collective = default_collective()
    flags = torch.zeros(collective.world_size, dtype=torch.int32)
    flags[collective.rank] = int(failed)
    return [rank for rank, flag in enumerate(collective.sum(flags).tolist()) if flag]


# --- Files ---

def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as out:
        out.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a finished checkpoint to the storage before it is declared complete."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(handle)
