"""Console progress of a run: one bar (step, samples/s, loss, ETA) and a final table.

A worker hands progress to a `Reporter`. Under torchrun rank 0 draws the bar itself (`ConsoleProgress`);
under Ray the launcher forwards the same calls to the driver, which owns the terminal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

TIMELINE_FILE = "timeline.json"
"""Start-up timeline of a run: wall-clock marks (time.time()) from rank 0 and the driver, for bench/startup.py."""


class Reporter(Protocol):
    """Receives rank 0's progress."""

    def start(self, total_steps: int, first_step: int) -> None: ...

    def update(self, step: int, metrics: dict[str, float]) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


class ConsoleProgress:
    """A tqdm bar on stderr; `update` sets the absolute step and shows loss and throughput."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total_steps: int, first_step: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        shown = {key: f"{value:.4g}" for key, value in metrics.items() if key in ("loss", "samples_per_s")}
        self.bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(rows: dict[str, Any]) -> str:
    """Two aligned columns, numbers to 4 significant digits."""
    width = max((len(key) for key in rows), default=0)
    lines = []
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key.ljust(width)}  {shown}")
    return "\n".join(lines)


def record_timeline(run_dir: Path, marks: dict[str, float]) -> None:
    """Merge `marks` (name → time.time()) into the run's timeline.json; called once by rank 0, once by the driver."""
    from trainer.checkpoint import write_json_atomic

    path = run_dir / TIMELINE_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    write_json_atomic(path, {**known, **marks})
