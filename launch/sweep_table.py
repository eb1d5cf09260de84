"""Tables of a sweep: a live one redrawn as trials report (a Ray Tune callback), and the final ranking."""

from __future__ import annotations

import math
from typing import Any, TextIO

from ray.tune import Callback

from launch.sweep_spec import SweepSpec, flatten


class TrialTable(Callback):
    """Redraws one line per trial (status, swept values, step, metric) whenever a trial starts, reports or ends."""

    def __init__(self, spec: SweepSpec, out: TextIO) -> None:
        self.spec = spec
        self.out = out
        self.rows: dict[str, dict[str, Any]] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self.rows.get(trial.trial_id, {})
        done = row.get("step") is not None and row.get("step") == row.get("total_steps")
        self._update(trial, "done" if done else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "ERROR")

    def _update(self, trial: Any, status: str, result: dict | None = None) -> None:
        row = self.rows.setdefault(trial.trial_id, {"trial": f"trial_{trial.trial_id}",
                                                    "params": flatten(trial.config)})
        row["status"] = status
        if result is not None and self.spec.metric in result:
            row.update(step=result["step"], total_steps=result.get("total_steps"), metric=result[self.spec.metric])
        self.out.write(render(list(self.rows.values()), self.spec, title="trials") + "\n")
        self.out.flush()


def ranked_rows(results: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid, best first; trials without the metric (errors) last."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        metric = metrics.get(spec.metric)
        step, total = metrics.get("step"), metrics.get("total_steps")
        if result.error is not None:
            status = f"error: {str(result.error).strip().splitlines()[-1][:80]}"
        elif metric is None:
            status = "no result"
        else:
            status = "done" if step == total else f"stopped early at step {step}/{total}"
        rows.append({"trial": f"trial_{metrics.get('trial_id', '?')}", "params": flatten(result.config or {}),
                     "step": step, "total_steps": total, "metric": metric, "status": status,
                     "run_dir": metrics.get("run_dir")})
    sign = -1.0 if spec.mode == "max" else 1.0

    def order(row: dict[str, Any]) -> tuple[bool, float]:
        metric = row["metric"]
        return metric is None, sign * float(metric if metric is not None else 0.0)

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def render_ranked(rows: list[dict[str, Any]], spec: SweepSpec) -> str:
    return render(rows, spec, title="ranked", ranked=True)


def render(rows: list[dict[str, Any]], spec: SweepSpec, title: str, ranked: bool = False) -> str:
    keys = list(spec.space)
    header = (["#"] if ranked else []) + ["trial"] + keys + ["step", spec.metric, "status"]
    lines = [header]
    for row in rows:
        step = "" if row.get("step") is None else f"{row['step']}/{row.get('total_steps')}"
        cells = ([str(row["rank"])] if ranked else []) + [row["trial"]]
        cells += [shown(row["params"].get(key)) for key in keys]
        cells += [step, shown(row.get("metric")), row.get("status", "")]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    return f"── {title} " + "─" * max(0, len(text[0]) - len(title) - 4) + "\n" + "\n".join(text)


def shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
