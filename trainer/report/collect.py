"""What a run report is made of, read from a run directory: its header, the training curves (train_loss.jsonl),
the evaluations over steps (metrics.jsonl) and final metrics (final_metrics.json), and the held-out figures
computed with the exported model (trainer/report/heldout.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import Config
from trainer.errors import CheckpointError, UserError
from trainer.report.heldout import HeldOutFigures
from trainer.tracking import METRICS_FILE, STEPS_FILE

FINAL_FILE = "final_metrics.json"


@dataclass
class ReportData:
    """Everything a report shows."""

    header: dict[str, str]
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    final: dict[str, Any]
    heldout: HeldOutFigures = field(default_factory=HeldOutFigures)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (none when it is missing; a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def check_run_dir(run_dir: Path) -> None:
    """A run directory is one with a config.yaml (every run writes one first)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); give runs/<name>")


def collect(run_dir: Path, data: str | None = None, *, require_heldout: bool = False) -> ReportData:
    """The report of `run_dir` (held-out figures on `data` or the run's data.test, when both the model and a
    split exist; else what is missing is said, or with `require_heldout` a UserError is raised)."""
    from trainer import config

    check_run_dir(run_dir)
    cfg = config.load(run_dir / "config.yaml")
    final_path = run_dir / FINAL_FILE
    final = json.loads(final_path.read_text()) if final_path.is_file() else {}
    report = ReportData(header(run_dir, cfg, final), read_jsonl(run_dir / STEPS_FILE),
                        read_jsonl(run_dir / METRICS_FILE), final)
    problem = _heldout_problem(run_dir, cfg, data)
    if problem is not None:
        if require_heldout:
            raise UserError(problem)
        report.heldout.missing["heldout"] = problem
        return report
    report.heldout = heldout_figures(run_dir, data)
    held_out = data or cfg.data.test
    report.header["data"] = f"train {cfg.data.train}; held out {held_out} ({report.heldout.items} items)"
    return report


def _heldout_problem(run_dir: Path, cfg: Config, data: str | None) -> str | None:
    if not (run_dir / "model" / "config.json").is_file():
        return f"{run_dir}: no exported model (model/config.json); the run has not finished"
    if data is None and cfg.data.test is None:
        return f"{run_dir}: the run has no held-out split (data.test); pass --data SHARDS"
    return None


def heldout_figures(run_dir: Path, data: str | None) -> HeldOutFigures:
    """Embed the held-out split (or `data`) with the run's exported model and analyse it."""
    from trainer.embed import load_model, shard_set_config
    from trainer.report.heldout import analyse, embed_heldout

    try:
        model, _, cfg = load_model(run_dir)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{run_dir / 'model'}: cannot load the exported model ({error})") from None
    if data is not None:
        cfg = shard_set_config(cfg, data)
    assert cfg.data.test is not None
    share, index = embed_heldout(model, cfg, cfg.data.test)
    return analyse(share, index, cfg.report, cfg.seed)


def header(run_dir: Path, cfg: Config, final: dict[str, Any]) -> dict[str, str]:
    """Run name, model, data, steps and date of the report's header."""
    model = cfg.model
    encoders = model.encoder if model.encoder_b is None else f"{model.encoder} / {model.encoder_b}"
    stamp = (run_dir / FINAL_FILE).stat().st_mtime if (run_dir / FINAL_FILE).is_file() else time.time()
    return {
        "run": run_dir.name,
        "model": f"{encoders}, embedding {model.embedding_dim}, loss {cfg.loss.name}",
        "data": f"train {cfg.data.train}; held out {cfg.data.test}",
        "steps": str(final.get("step", "?")),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp)),
    }
