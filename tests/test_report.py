"""The run report (trainer/report/): its numbers against brute force on small data, the report a real run writes
at its end (opened in a real headless Chromium: every figure rendered, the screenshot not blank), thumbnails for
image items and texts for text items, W&B media in offline mode, and `twinscale report`.

Run: pytest tests/test_report.py (the end-to-end ones are marked slow). Set TWINSCALE_REQUIRE_BROWSER=1 to fail,
not skip, when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.cli import main as twinscale
from trainer import config
from trainer.report import REPORT_FILE, report_at_end, write_report
from trainer.report.collect import collect
from trainer.report.items import image_thumbnail, raw_samples
from trainer.report.neighbours import has_partner, nearest, per_class_precision, worst_queries

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
FIGURES = {"loss", "metrics", "distances", "roc", "map"}


# --- The numbers, against a dense similarity matrix (small N, in the test only) ---

def _dense(documents: np.ndarray, queries: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(queries), dim=1) @ \
        torch.nn.functional.normalize(torch.from_numpy(documents), dim=1).T


def test_nearest_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    documents, queries = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    found = nearest(documents, queries, 7)
    scores, ids = _dense(documents, queries).topk(7, dim=1)
    assert np.array_equal(found.ids, ids.numpy())
    assert np.allclose(found.scores, scores.numpy(), atol=1e-5)


def test_nearest_among_the_items_leaves_each_query_out() -> None:
    rng = np.random.default_rng(1)
    items = rng.normal(size=(9000, 6)).astype(np.float32)  # over one query block of 4096
    found = nearest(items, items, 3, same_items=True)
    assert not (found.ids == np.arange(len(items))[:, None]).any()
    sample = rng.choice(len(items), 40, replace=False)
    full = _dense(items, items[sample])
    full[torch.arange(40), torch.from_numpy(sample)] = -2.0
    assert np.array_equal(found.ids[sample], full.topk(3, dim=1).indices.numpy())


def _labeled(n: int = 240, classes: int = 6, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, 5))
    return (centres[labels] + rng.normal(scale=1.2, size=(n, 5))).astype(np.float32), labels


def _brute_top1(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dense = _dense(embeddings, embeddings)
    dense.fill_diagonal_(-2.0)
    scores, ids = dense.max(dim=1)
    return scores.numpy(), ids.numpy()


def test_per_class_precision_at_1_matches_brute_force() -> None:
    embeddings, labels = _labeled()
    labels[0] = 99  # a class of one item: no query of it can be right, so it is not scored
    found = nearest(embeddings, embeddings, 1, same_items=True)
    right = labels[found.ids[:, 0]] == labels
    table = {row.label: row for row in per_class_precision(labels, right, has_partner(labels))}
    _, top = _brute_top1(embeddings)
    assert 99 not in table and sum(row.queries for row in table.values()) == len(labels) - 1
    for label, row in table.items():
        members = np.flatnonzero(labels == label)
        assert row.queries == len(members)
        assert row.precision_at_1 == pytest.approx(float(np.mean(labels[top[members]] == label)))
    # Untrained (random) embeddings are far from perfect; an implementation that marks every query right is not.
    assert 0.2 < np.mean([row.precision_at_1 for row in table.values()]) < 0.95


def test_worst_queries_match_brute_force() -> None:
    embeddings, labels = _labeled(seed=3)
    found = nearest(embeddings, embeddings, 1, same_items=True)
    right = labels[found.ids[:, 0]] == labels
    worst = worst_queries(found.scores[:, 0], right, np.ones(len(labels), bool), 5)
    scores, top = _brute_top1(embeddings)
    wrong = np.flatnonzero(labels[top] != labels)
    expected = wrong[np.argsort(-scores[wrong], kind="stable")][:5]
    assert len(wrong) > 5 and np.array_equal(worst, expected)
    assert (labels[top[worst]] != labels[worst]).all()


def test_thumbnail_is_a_small_png() -> None:
    out = io.BytesIO()
    Image.new("RGB", (640, 320), (200, 30, 30)).save(out, format="JPEG")
    with Image.open(io.BytesIO(image_thumbnail(out.getvalue()))) as thumbnail:
        assert thumbnail.format == "PNG" and thumbnail.size == (96, 48)
        assert thumbnail.convert("RGB").getpixel((40, 20))[0] > 150


def test_raw_samples_are_in_evaluation_order(digits_recipe: Path) -> None:
    from trainer.data.shardsets import open_data
    from trainer.data.stream import eval_batches

    cfg = config.load(digits_recipe)
    assert cfg.data.test is not None
    keys = [key for batch in eval_batches(cfg.data.test, cfg.data, batch_size=256) for key in batch["keys"]]
    wanted = [0, 127, 128, 300, len(keys) - 1]  # shard ends and starts (128 samples per shard), the last one
    raw = raw_samples(open_data(cfg.data.test, cfg.data), wanted)
    assert {p: raw[p]["__key__"] for p in wanted} == {p: keys[p] for p in wanted}


def test_a_failing_report_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_at_end(tmp_path / "not-a-run", None, 10)
    assert "warning: run report not written" in capsys.readouterr().err
    assert not (tmp_path / "not-a-run" / REPORT_FILE).exists()


# --- Real runs ---

def _train(recipe: Path, name: str, *settings: str, wandb: bool = False) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY"):
        env.pop(variable, None)
    command = [sys.executable, "-m", "trainer.train", str(recipe), "--set", f"name={name}",
               "--set", f"log.wandb={str(wandb).lower()}", "--set", "report.enabled=true",
               *[part for s in settings for part in ("--set", s)]]
    done = subprocess.run(command, cwd=recipe.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "warning: run report" not in done.stderr, done.stderr[-2000:]
    return recipe.parent / "runs" / name


def open_in_browser(page: Path, work: Path) -> tuple[str, Image.Image]:
    """The DOM after load (the page's script has run) and a screenshot, from a real headless Chromium."""
    if not CHROMIUM.is_file():
        if os.environ.get("TWINSCALE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and TWINSCALE_REQUIRE_BROWSER=1")
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to open the report in a browser")
    common = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--virtual-time-budget=5000"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*common, f"--user-data-dir={work / 'dom'}", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = work / "screenshot.png"
    taken = subprocess.run([*common, f"--user-data-dir={work / 'shot'}", f"--screenshot={shot}",
                            "--window-size=1280,2400", url], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    return dom.stdout, Image.open(shot).convert("RGB")


def _body(dom: str) -> dict[str, int]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None
    return {name: int(value) for name, value in re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1))}


def _thumbnails(html: str) -> list[Image.Image]:
    found = re.findall(r"<img class='thumb' alt='[^']*' src='data:image/png;base64,([^']+)'", html)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


@pytest.fixture(scope="module")
def digits_run(digits_recipe: Path) -> Path:
    """The digits recipe trained briefly in one process, with W&B offline."""
    return _train(digits_recipe, "report-digits", "optim.epochs=2", "optim.warmup_steps=4", "eval.every_steps=16",
                  wandb=True)


@pytest.mark.slow
def test_run_writes_a_report_that_renders_in_a_browser(digits_run: Path, tmp_path: Path) -> None:
    page = digits_run / REPORT_FILE
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: self-contained
    assert {f"figure-{name}" for name in FIGURES} <= set(re.findall(r"id='(figure-[a-z]+)'", html))
    dom, screenshot = open_in_browser(page, tmp_path)
    counts = _body(dom)
    assert counts["figures"] == counts["figures-rendered"] == len(FIGURES), counts
    assert counts["thumbnails"] == counts["thumbnails-rendered"] >= 8 * 6, counts  # 2 galleries × 4 × (1 + 5)
    for natural in re.findall(r'class="figure"[^>]*data-natural="(\d+)x(\d+)"', dom):
        assert int(natural[0]) > 300 and int(natural[1]) > 200
    pixels = np.asarray(screenshot).astype(np.int16)
    inked = (pixels.min(axis=2) < 245).mean()
    colourful = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()  # text alone is grey: ~0
    assert inked > 0.04 and colourful > 0.005, (inked, colourful)  # measured 0.061 and 0.016; blank: 0 and 0
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200  # curves, histograms, a coloured map: 2223


@pytest.mark.slow
def test_report_numbers_agree_with_the_run(digits_run: Path) -> None:
    report = collect(digits_run)
    final = json.loads((digits_run / "final_metrics.json").read_text())
    table = report.heldout.per_class
    assert [row.label for row in table] == list(range(10)) and sum(row.queries for row in table) == 719
    weighted = sum(row.queries * row.precision_at_1 for row in table) / 719
    assert weighted == pytest.approx(final["precision_at_1"], abs=0.01)  # the same model, the same faiss k-NN
    assert report.heldout.pairs is not None and report.heldout.pairs.accuracy > 0.8
    assert [row["step"] for row in report.evals][0] == 0 and report.steps[-1]["step"] == final["step"]
    worst = report.heldout.galleries[1]
    assert worst.rows and all(row.neighbours[0][2] is False for row in worst.rows)
    assert all(image.format == "PNG" for image in _thumbnails((digits_run / REPORT_FILE).read_text()))


@pytest.mark.slow
def test_report_figures_go_to_wandb(digits_run: Path) -> None:
    media = list((digits_run / "wandb").glob("offline-run-*/files/media"))
    assert len(media) == 1
    images = {path.name.split("_")[0] for path in (media[0] / "images" / "report").glob("*.png")}
    assert images == FIGURES
    pages = list((media[0] / "html" / "report").glob("page_*.html"))
    assert len(pages) == 1 and "figure-map" in pages[0].read_text()


@pytest.mark.slow
def test_image_run_shows_thumbnails(tmp_path: Path) -> None:
    assert twinscale(["shards", "digits", "--kind", "labeled", "--as-images", "--out", str(tmp_path / "images"),
                      "--test-fraction", "0.3", "--samples-per-shard", "256"]) == 0
    recipe = tmp_path / "images.yaml"
    recipe.write_text(f"data: {{train: {tmp_path}/images/train, test: {tmp_path}/images/test, batch_size: 64}}\n"
                      "model: {encoder: cnn, channels: [8, 16], embedding_dim: 16}\n"
                      "loss: {name: supcon}\nmining: {name: none}\noptim: {max_steps: 8, warmup_steps: 2}\n")
    run_dir = _train(recipe, "images")
    thumbnails = _thumbnails((run_dir / REPORT_FILE).read_text())
    assert len(thumbnails) >= 8 * 6
    for thumbnail in thumbnails:
        assert thumbnail.format == "PNG" and thumbnail.size == (96, 96)
        assert len(set(thumbnail.convert("L").getdata())) > 2  # a digit, not a flat square


@pytest.mark.slow
def test_text_pair_run_shows_texts(tmp_path: Path) -> None:
    words = ["red apple", "green pear", "blue sky", "dark night", "warm sun", "cold snow", "big ship", "old tree"]
    rows = ["a,b,similar"] + [f"{words[i % 8]} {i % 5},{words[i % 8].upper() if i % 2 == 0 else words[(i + 3) % 8]},"
                              f"{int(i % 2 == 0)}" for i in range(256)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert twinscale(["shards", str(tmp_path / "pairs.csv"), "--kind", "pairs", "--out", str(tmp_path / "shards"),
                      "--test-fraction", "0.25", "--samples-per-shard", "64"]) == 0
    recipe = tmp_path / "text.yaml"
    recipe.write_text(f"data: {{train: {tmp_path}/shards/train, test: {tmp_path}/shards/test, batch_size: 16, "
                      "text_buckets: 4096}\nmodel: {architecture: pseudo_siamese, encoder: text, embedding_dim: 16}\n"
                      "loss: {name: infonce, temperature: 0.2}\nmining: {name: none}\noptim: {epochs: 2}\n")
    run_dir = _train(recipe, "text")
    html = (run_dir / REPORT_FILE).read_text()
    texts = re.findall(r"<div class='text'>([^<]*)</div>", html)
    assert len(texts) >= 4 * 6 and all(any(word in text.lower() for word in words) for text in texts)
    assert "figure-roc" in html and "figure-distances" in html  # pair data: ROC and histograms
    assert "No per-class table" in html  # a pair split without class ids: said, not drawn
    report = collect(run_dir)
    for gallery in report.heldout.galleries:
        for row in gallery.rows:  # a side-a text queries side-b texts; the right one is its pair's own (upper case)
            for item, _, right in row.neighbours:
                assert not right or item.text == (row.query.text or "").rsplit(" ", 1)[0].upper()


@pytest.mark.slow
def test_triplet_run_marks_neighbours_by_class(tmp_path: Path) -> None:
    assert twinscale(["shards", "digits", "--kind", "triplets", "--out", str(tmp_path / "triplets"),
                      "--test-fraction", "0.3", "--samples-per-shard", "256"]) == 0
    recipe = tmp_path / "triplets.yaml"
    recipe.write_text(f"data: {{train: {tmp_path}/triplets/train, test: {tmp_path}/triplets/test, batch_size: 64}}\n"
                      "model: {encoder: mlp, hidden_dims: [64], embedding_dim: 16}\n"
                      "loss: {name: triplet}\nmining: {name: none}\noptim: {max_steps: 10}\n")
    report = collect(_train(recipe, "triplets"))
    assert report.heldout.pairs is not None  # (anchor, positive) and (anchor, negative) pairs
    assert [row.label for row in report.heldout.per_class] == list(range(10))  # anchors' classes
    for gallery in report.heldout.galleries:
        for row in gallery.rows:  # an anchor queries positives; right ones are of its class
            assert all(right == (item.label == row.query.label) for item, _, right in row.neighbours)


@pytest.mark.slow
def test_report_command(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again.html"
    assert twinscale(["report", str(digits_run), "--out", str(out)]) == 0
    assert out.is_file() and "figure-roc" in out.read_text() and str(out) in capsys.readouterr().out
    # --data: another split, here the training one (1078 digits in the map).
    train = str(config.load(digits_run / "config.yaml").data.train)
    assert twinscale(["report", str(digits_run), "--out", str(out), "--data", train]) == 0
    assert f"held out {train} (1078 items)" in out.read_text()


@pytest.mark.slow
def test_report_command_errors(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert twinscale(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert twinscale(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(digits_run / "config.yaml", unfinished / "config.yaml")
    assert twinscale(["report", str(unfinished)]) == 2
    assert "no exported model" in capsys.readouterr().err
    no_test = tmp_path / "no-test"
    shutil.copytree(digits_run / "model", no_test / "model")
    config.dump(config.load(digits_run / "config.yaml", ["data.test=null"]), no_test / "config.yaml")
    assert twinscale(["report", str(no_test)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no held-out split" in err and "--data" in err
    # At the end of a run the same report is written without the held-out figures, saying why.
    html = write_report(no_test).read_text()
    assert "figure-map" not in html and "no held-out split" in html
