"""The report as one self-contained HTML page: figures and thumbnails as PNG data URIs, inline CSS and one inline
script, nothing fetched from the network.

The script runs on load: it stamps each figure and thumbnail <img> with its natural size (`data-natural`) and
counts the rendered ones into attributes of <body> (`data-figures`, `data-figures-rendered`, `data-thumbnails`,
`data-thumbnails-rendered`), so a headless browser's dumped DOM shows what rendered (tests/test_report.py).
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from trainer.report.collect import ReportData
from trainer.report.heldout import Gallery
from trainer.report.items import Preview

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } .missing { color: #888; font-style: italic; }
.header td:first-child { font-weight: bold; } img.figure { max-width: 100%; margin: 4px; }
.row { display: flex; gap: 8px; align-items: flex-start; margin: 8px 0; padding: 6px; border-bottom: 1px solid #eee; }
.item { width: 120px; font-size: 11px; text-align: center; padding: 3px; border: 2px solid transparent; }
.item.query { background: #eef3fb; } .item.right { border-color: #2a9d4b; } .item.wrong { border-color: #d62828; }
.item .text { text-align: left; max-height: 110px; overflow: hidden; } img.thumb { image-rendering: pixelated; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  function stamp(selector, name) {
    var all = document.querySelectorAll(selector), ok = 0;
    all.forEach(function (img) {
      img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
      if (img.complete && img.naturalWidth > 0) { ok += 1; }
    });
    document.body.setAttribute('data-' + name, all.length);
    document.body.setAttribute('data-' + name + '-rendered', ok);
  }
  stamp('img.figure', 'figures');
  stamp('img.thumb', 'thumbnails');
});
"""

CLASS_ROWS = 25
"""Rows of each end of the per-class table when there are many classes."""
TITLES = {"loss": "training loss and learning rate", "metrics": "evaluation metrics over steps",
          "distances": "similarity of positive and negative pairs", "roc": "ROC curve", "map": "embedding map"}


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render(report: ReportData, figures: dict[str, bytes]) -> str:
    """The whole page."""
    missing = report.heldout.missing
    held_out_reason = missing.get("heldout")
    sections = [
        _section("Training", [_figure(figures, "loss", "no training steps logged (train_loss.jsonl)")]),
        _section("Evaluation", [_figure(figures, "metrics", "no evaluation logged (metrics.jsonl)"),
                                _metrics_table(report.final)]),
        _section("Held-out pairs", [_figure(figures, "distances", held_out_reason or missing.get("distances", "")),
                                    _figure(figures, "roc", held_out_reason or missing.get("distances", ""))]),
        _section("Embedding map", [_figure(figures, "map", held_out_reason or "too few held-out items")]),
        _section("Nearest neighbours", [_gallery(g) for g in report.heldout.galleries]
                 or [_missing(held_out_reason or missing.get("galleries", "no queries"))]),
        _section("Precision@1 per class", [_class_table(report)]),
    ]
    title = f"Twinscale report: {escape(report.header.get('run', ''))}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head>\n<body>\n<h1>{title}</h1>\n"
            f"{_header(report.header)}\n{''.join(sections)}</body></html>\n")


def _section(title: str, parts: list[str]) -> str:
    return f"<section><h2>{escape(title)}</h2>\n{''.join(parts)}</section>\n"


def _missing(reason: str) -> str:
    return f"<p class='missing'>{escape(reason)}</p>\n"


def _figure(figures: dict[str, bytes], name: str, reason: str) -> str:
    if name not in figures:
        return _missing(f"No {TITLES[name]}: {reason}" if reason else f"No {TITLES[name]}.")
    return f"<img class='figure' id='figure-{name}' alt='{escape(TITLES[name])}' src='{data_uri(figures[name])}'>\n"


def _table(head: list[str], rows: list[list[Any]], css: str = "") -> str:
    cells = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    head_row = f"<tr>{cells}</tr>" if head else ""
    return f"<table class='{css}'>{head_row}{body}</table>\n"


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _header(header: dict[str, str]) -> str:
    return _table([], [[key, value] for key, value in header.items()], "header")


def _metrics_table(final: dict[str, Any]) -> str:
    if not final:
        return _missing("No final metrics (final_metrics.json): the run has not finished.")
    return "<h3>Final metrics</h3>\n" + _table(["metric", "value"], [[k, v] for k, v in final.items()])


def _class_table(report: ReportData) -> str:
    rows = report.heldout.per_class
    if not rows:
        reason = report.heldout.missing.get("heldout") or report.heldout.missing.get("per_class", "")
        return _missing(f"No per-class table: {reason}")
    ordered = sorted(rows, key=lambda row: (row.precision_at_1, row.label))  # worst classes first
    note = ""
    if len(ordered) > 2 * CLASS_ROWS:  # thousands of classes: the worst and the best say what matters
        note = f"<p>{len(ordered)} classes: the {CLASS_ROWS} worst and the {CLASS_ROWS} best.</p>\n"
        ordered = ordered[:CLASS_ROWS] + ordered[-CLASS_ROWS:]
    return note + _table(["class", "queries", "precision@1"],
                         [[r.label, r.queries, r.precision_at_1] for r in ordered], "per-class")


def _gallery(gallery: Gallery) -> str:
    if not gallery.rows:
        return f"<h3>{escape(gallery.title)}</h3>\n" + _missing("none: every query's nearest neighbour is right")
    rows = []
    for row in gallery.rows:
        cells = [_item(row.query, "query", "query")]
        for rank, (item, score, right) in enumerate(row.neighbours, 1):
            mark = "" if right is None else (" right" if right else " wrong")
            verdict = "" if right is None else (" ✓" if right else " ✗")
            cells.append(_item(item, f"#{rank} {score:.3f}{verdict}", "neighbour" + mark))
        rows.append(f"<div class='row'>{''.join(cells)}</div>\n")
    return f"<h3>{escape(gallery.title)}</h3>\n{''.join(rows)}"


def _item(item: Preview, caption: str, css: str) -> str:
    label = "" if item.label is None else f" · class {item.label}"
    if item.png is not None:
        body = f"<img class='thumb' alt='{escape(item.key)}' src='{data_uri(item.png)}'>"
    else:
        body = f"<div class='text'>{escape(item.text or '(no preview)')}</div>"
    return (f"<div class='item {css}'>{body}<div>{escape(caption)}</div>"
            f"<div title='{escape(item.key)}'>{escape(item.key[-24:])}{escape(label)}</div></div>")
