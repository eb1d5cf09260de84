"""Checkpoints and the state contract of a run.

Layout: `<run_dir>/checkpoints/step_00000120/` holds every rank's DeepSpeed files, the cross-batch memory
(`memory.safetensors`, identical on every rank, written by rank 0) when it is on, and, written last by rank 0
once all ranks have finished, `run_state.json`. A checkpoint is complete only when that file exists, so
"latest" is the newest directory that has it; older complete checkpoints beyond `keep_last` are removed.
Nothing here unpickles: run state is JSON and DeepSpeed files load with `weights_only=True` (engine.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import CheckpointError
from trainer.objectives.memory import MemoryBank

STATE_FILE = "run_state.json"
MEMORY_FILE = "memory.safetensors"


@dataclass
class RunState:
    """Everything besides DeepSpeed's own state that a resumed run needs."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epoch the next step belongs to."""
    batches_into_epoch: int = 0
    """Batches of `epoch` already consumed on every rank."""
    samples_seen: int = 0
    """Training samples consumed over all workers."""
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
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(engine: Any, run_dir: Path, state: RunState, keep_last: int, rank: int,
         memory: MemoryBank | None = None) -> Path:
    """Save on every rank (DeepSpeed's save is collective), then mark complete and prune on rank 0."""
    tag = f"step_{state.step:08d}"
    engine.save_checkpoint(str(checkpoints_dir(run_dir)), tag=tag, save_latest=False)
    target = checkpoints_dir(run_dir) / tag
    if rank == 0 and memory is not None:
        save_file(memory.state_dict(), target / MEMORY_FILE)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        write_json_atomic(target / STATE_FILE, asdict(state))
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return target


def load(engine: Any, run_dir: Path, memory: MemoryBank | None = None) -> RunState:
    """Restore DeepSpeed state (and the memory bank) from the newest complete checkpoint; return the run state."""
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from under {checkpoints_dir(run_dir)}")
    loaded, _ = engine.load_checkpoint(str(found.parent), tag=found.name, load_module_strict=True)
    if loaded is None:
        raise CheckpointError(f"{found}: DeepSpeed could not load this checkpoint")
    if memory is not None:
        load_memory(memory, found / MEMORY_FILE)
    return RunState.from_json(found / STATE_FILE)


def load_memory(memory: MemoryBank, path: Path) -> None:
    """Restore the cross-batch memory saved with a checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {MEMORY_FILE}; this checkpoint was saved without "
                              f"mining.memory_size, so it cannot resume a run that uses the memory")
    try:
        memory.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable memory bank ({error})") from None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
