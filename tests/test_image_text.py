"""Image–text two towers end to end: glyph images ↔ their Unicode names (trainer/data/fonts.py), a CNN image tower
and a text tower trained with loss.name=clip, evaluated image → name on held-out faces.

The fonts are the DejaVu faces every Debian machine here has (fonts-dejavu-core); the recipe itself
(configs/glyphs_clip.yaml) uses ~160 faces from the packages its header names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer.data import fonts
from trainer.data.formats import ViewSpec, read_index
from trainer.errors import DataError

REPO = Path(__file__).resolve().parent.parent
DEJAVU = [p for p in fonts.font_files() if p.name.startswith("DejaVu") and "Math" not in p.name]
needs_dejavu = pytest.mark.skipif(len(DEJAVU) < 6, reason="needs the DejaVu fonts (fonts-dejavu-core)")


@needs_dejavu
def test_glyphs_render_only_what_a_face_has_and_clones_split_together() -> None:
    faces = fonts.glyphs(DEJAVU[:3], "Aβ\U000E0001", 24)  # a tag character no DejaVu face maps: its .notdef box
    assert faces and all(set(drawn) == {"A", "β"} for drawn in faces.values())
    pixels = next(iter(faces.values()))["A"]
    assert pixels.shape == (24, 24) and pixels.dtype == np.uint8 and pixels.min() < 128 < pixels.max()
    assert fonts.family_group("TeX Gyre Termes") == fonts.family_group("Nimbus Roman") == "times"
    assert fonts.family_group("Liberation Mono") == fonts.family_group("FreeMono") == "courier"
    noto = fonts.family_group("Noto Sans")
    assert fonts.family_group("Noto Sans Display") == noto != fonts.family_group("Noto Serif")
    with pytest.raises(DataError, match="too few"):  # one design cannot be split into seen and unseen faces
        fonts.split_groups({"DejaVu Sans Book": {}, "DejaVu Serif Book": {}}, 0.5, seed=0)


@needs_dejavu
@pytest.mark.slow
def test_image_to_name_retrieval_learns_on_unseen_faces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DejaVu's designs (Sans, Serif, Sans Mono) as groups of their own here, so that one can be held out.
    monkeypatch.setitem(fonts.CLONES, "dejavu", ("dejavu-none",))
    counts = fonts.write_glyphs(tmp_path / "glyphs", chars=fonts.LATIN[:26], size=16, test_fraction=0.34, seed=2,
                                files=DEJAVU)
    assert counts["train"] > 0 and counts["test"] > 0
    index = read_index(tmp_path / "glyphs" / "captions" / "train")
    assert index.kind == "pairs" and index.views["a"] == ViewSpec("png", (1, 16, 16))
    recipe = yaml.safe_load((REPO / "configs" / "glyphs_clip.yaml").read_text())
    recipe["data"].update(train=str(tmp_path / "glyphs/captions/train"), test=str(tmp_path / "glyphs/captions/test"),
                          batch_size=32, text_buckets=4096, image={**recipe["data"]["image"], "size": 16, "resize": 16})
    recipe["model"]["channels"] = [16, 32]
    recipe.update(name="glyphs", output_dir=str(tmp_path / "runs"), log={"wandb": False},
                  optim={**recipe["optim"], "epochs": 12, "warmup_steps": 5}, dist={"workers": 1},
                  eval={"every_steps": 0})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "trainer.train", str(tmp_path / "recipe.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    evals = [json.loads(line) for line in (tmp_path / "runs/glyphs/metrics.jsonl").read_text().splitlines()]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] > 0
    # 26 names: chance is R@1 ≈ 0.04; the untrained towers score about that.
    assert start["retrieval_a2b/recall_at_1"] < 0.15
    assert end["retrieval_a2b/recall_at_1"] > 0.5, end
