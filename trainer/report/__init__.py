"""The run report: RUN/report.html, one self-contained page of a run's curves, held-out figures and
nearest-neighbour galleries (collect.py reads the data, heldout.py and neighbours.py compute it, figures.py draws,
page.py lays it out).

Written at the end of every run (trainer/train.py; `report.enabled`) and by `twinscale report RUN [--out FILE]
[--data SHARDS]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class RenderedReport:
    """A report's page and its figures (PNG bytes by name), before it is written."""

    html: str
    figures: dict[str, bytes]


def render_report(run_dir: Path, data: str | None = None, *, require_heldout: bool = False) -> RenderedReport:
    """Collect, draw and lay out the report of `run_dir` (see `collect.collect`)."""
    from trainer.report.collect import collect
    from trainer.report.figures import draw_all
    from trainer.report.page import render

    report = collect(run_dir, data, require_heldout=require_heldout)
    figures = draw_all(report)
    return RenderedReport(render(report, figures), figures)


def write_html(html: str, out: Path) -> Path:
    """Write the page atomically (a temporary name, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(html, encoding="utf-8")
    os.replace(temporary, out)
    return out


def write_report(run_dir: Path, out: Path | None = None, data: str | None = None, *,
                 require_heldout: bool = False) -> Path:
    """Write the report of `run_dir` to `out` (default RUN/report.html) and return its path."""
    rendered = render_report(run_dir, data, require_heldout=require_heldout)
    return write_html(rendered.html, out or run_dir / REPORT_FILE)


def report_at_end(run_dir: Path, tracker: Any, step: int) -> None:
    """At the end of a run: write the report and send its figures to W&B; a failure only warns (the run is done)."""
    try:
        rendered = render_report(run_dir)
        write_html(rendered.html, run_dir / REPORT_FILE)
        if tracker is not None:
            tracker.log_media(rendered.figures, rendered.html, step)
    except Exception as error:  # anything at all: a finished run must not fail over its report
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"warning: run report not written ({type(error).__name__}: {detail}); "
              f"`twinscale report {run_dir}` retries it", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    """`twinscale report RUN [--out FILE] [--data SHARDS]`: write the report and print its path."""
    from trainer.data.remote import is_url

    run_dir = Path(args.run_dir)
    if is_url(args.run_dir):
        from trainer.remote_runs import fetch_outputs

        run_dir = fetch_outputs(args.run_dir.rstrip("/"))
    out = write_report(run_dir, args.out, args.data, require_heldout=True)
    print(out)
    return 0
