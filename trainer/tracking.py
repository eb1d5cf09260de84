"""Run outputs on rank 0: Weights & Biases (imported lazily) and the run directory's metric files.

W&B never blocks a run for long: with no API key it runs offline; with one it waits at most
`log.init_timeout_s` for the server and then falls back to offline, saying so once. Steps are always explicit,
so a resumed run continues its step axis.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import LogConfig


class Tracker:
    """Where metrics go on rank 0: `metrics.jsonl` in the run directory and, when enabled, W&B."""

    def __init__(self, run_dir: Path, wandb_run: Any = None) -> None:
        self.run_dir = run_dir
        self.wandb_run = wandb_run

    @property
    def run_id(self) -> str | None:
        return None if self.wandb_run is None else str(self.wandb_run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Training metrics (W&B only; they are frequent)."""
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_eval(self, metrics: dict[str, float], step: int) -> None:
        """Evaluation metrics: one JSON line in metrics.jsonl, and W&B under `eval/`."""
        with open(self.run_dir / "metrics.jsonl", "a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")
        self.log({f"eval/{key}": value for key, value in metrics.items()}, step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the final summary and close W&B."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()


def start_tracker(cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], resume_id: str | None) -> Tracker:
    """A tracker for rank 0, with W&B started unless disabled."""
    if not cfg.wandb:
        return Tracker(run_dir)
    import wandb

    mode = _mode(cfg)
    try:
        run = _init(wandb, cfg, run_dir, run_config, resume_id, mode)
    except Exception as error:  # any failure to reach or configure the server: keep training, offline
        if mode == "offline":
            raise
        print(f"W&B: could not start online ({type(error).__name__}: {error}); logging offline instead",
              file=sys.stderr)
        run = _init(wandb, cfg, run_dir, run_config, resume_id, "offline")
    return Tracker(run_dir, run)


def _mode(cfg: LogConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _init(wandb: Any, cfg: LogConfig, run_dir: Path, run_config: dict[str, Any], resume_id: str | None,
          mode: str) -> Any:
    return wandb.init(
        project=cfg.project, entity=cfg.entity, name=run_dir.name, dir=str(run_dir), config=run_config,
        id=resume_id, resume="allow" if resume_id else None, mode=mode,
        settings=wandb.Settings(init_timeout=cfg.init_timeout_s, console="off", silent=True),
    )
