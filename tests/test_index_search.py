"""`twinscale index`, `search` and `verify` on real trained models (trainer/index.py, trainer/search.py,
launch/index_job.py): a CNN on digit images (an image folder written from its held-out shards), and a CLIP-style
image–text model on glyphs ↔ their Unicode names (DejaVu faces), each trained for a few seconds in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.cli import main as twinscale
from trainer.data import fonts

REPO = Path(__file__).resolve().parent.parent
DEJAVU = [p for p in fonts.font_files() if p.name.startswith("DejaVu") and "Math" not in p.name]
DIGITS_CNN = """\
name: digits
output_dir: {root}/runs
data: {{train: {root}/shards/train, test: {root}/shards/test, batch_size: 64}}
model: {{encoder: cnn, channels: [16, 32], embedding_dim: 16}}
loss: {{name: supcon}}
mining: {{name: none}}
log: {{wandb: false}}
optim: {{epochs: 3, warmup_steps: 4}}
eval: {{every_steps: 0}}
"""


def _train(recipe: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "trainer.train", str(recipe)], cwd=recipe.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _folder_from_shards(shards: Path, root: Path) -> Path:
    """root/digit<class>/<key>.png from labeled image shards (their PNG bytes as written)."""
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]
        for name, data in members.items():
            if name.endswith(".input.png"):
                key = name.removesuffix(".input.png")
                path = root / f"digit{int(members[key + '.cls'])}" / f"{key}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN trained on digit images (runs/digits) and its held-out images as a folder (photos/)."""
    root = tmp_path_factory.mktemp("digits-cnn")
    assert twinscale(["shards", "digits", "--as-images", "--kind", "labeled", "--out", str(root / "shards"),
                      "--test-fraction", "0.4", "--samples-per-shard", "128"]) == 0
    (root / "recipe.yaml").write_text(DIGITS_CNN.format(root=root))
    _train(root / "recipe.yaml")
    _folder_from_shards(root / "shards" / "test", root / "photos")
    return root


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP-style run (CNN image tower a, hashed n-gram text tower b) on DejaVu glyphs ↔ names."""
    if len(DEJAVU) < 6:
        pytest.skip("needs the DejaVu fonts (fonts-dejavu-core)")
    root = tmp_path_factory.mktemp("glyphs")
    saved = fonts.CLONES.get("dejavu")
    fonts.CLONES["dejavu"] = ("dejavu-none",)  # DejaVu's designs as groups of their own, so one is held out
    try:
        fonts.write_glyphs(root / "glyphs", chars=fonts.LATIN[:26], size=16, test_fraction=0.34, seed=2,
                           files=DEJAVU)
    finally:
        if saved is not None:
            fonts.CLONES["dejavu"] = saved
    recipe = yaml.safe_load((REPO / "configs" / "glyphs_clip.yaml").read_text())
    recipe["data"].update(train=str(root / "glyphs/captions/train"), test=str(root / "glyphs/captions/test"),
                          batch_size=32, text_buckets=4096,
                          image={**recipe["data"]["image"], "size": 16, "resize": 16})
    recipe["model"]["channels"] = [16, 32]
    recipe.update(name="glyphs", output_dir=str(root / "runs"), log={"wandb": False},
                  optim={**recipe["optim"], "epochs": 12, "warmup_steps": 5}, dist={"workers": 1},
                  eval={"every_steps": 0})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _train(root / "recipe.yaml")
    return root


TOPICS = {"sport": ["football match", "tennis player", "the team won", "a goal scored", "the runner raced"],
          "food": ["fresh bread", "a bowl of soup", "the cook baked", "sweet apple pie", "rice and beans"],
          "weather": ["heavy rain", "a sunny morning", "cold wind blows", "snow on the hills", "a storm came"],
          "music": ["the band played", "a loud guitar", "piano lessons", "she sang a song", "drums and bass"]}
TEXT_BERT = """\
name: text
output_dir: {root}/runs
data: {{train: {root}/shards/train, test: {root}/shards/test, batch_size: 16}}
model: {{encoder: hf, pretrained: {root}/bert, max_length: 16, embedding_dim: 8}}
loss: {{name: supcon}}
mining: {{name: none}}
optim: {{lr: 0.01, max_steps: 8, warmup_steps: 1}}
log: {{wandb: false}}
eval: {{every_steps: 0}}
"""


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Siamese tiny-BERT text model (its tokenizer exported with it) trained briefly on topic sentences."""
    from tests.hf_models import save_tiny_bert

    root = tmp_path_factory.mktemp("texts")
    save_tiny_bert(root / "bert")
    lines = [f"{p} {s}" for ps in TOPICS.values() for p in ps for s in ("today", "again", "at noon", "in town")]
    labels = [label for label, ps in enumerate(TOPICS.values()) for _ in ps for _ in range(4)]
    (root / "texts.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(lines, labels, strict=True)))
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    assert twinscale(["shards", str(root / "texts.csv"), "--kind", "labeled", "--out", str(root / "shards"),
                      "--test-fraction", "0.3", "--samples-per-shard", "32"]) == 0
    (root / "recipe.yaml").write_text(TEXT_BERT.format(root=root))
    _train(root / "recipe.yaml")
    return root


def _index(model: Path, data: Path | str, out: Path, *flags: str) -> None:
    assert twinscale(["index", str(model), str(data), "--out", str(out), *flags]) == 0


def _search(capsys: pytest.CaptureFixture[str], index: Path, queries: list[str], k: int = 10) -> list[dict]:
    capsys.readouterr()
    assert twinscale(["search", str(index), *queries, "--k", str(k), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert twinscale(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _vectors(index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.read_index(str(index_dir / "index.faiss"))
    with np.load(index_dir / "items.npz", allow_pickle=False) as items:
        keys = items["keys"]
    return keys, index.reconstruct_n(0, index.ntotal) if hasattr(index, "reconstruct_n") else None


def test_image_search_finds_the_query_and_its_class(digits: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = digits / "index-flat"
    _index(digits / "runs" / "digits", digits / "photos", out, "--part-size", "200")
    document = json.loads((out / "index.json").read_text())
    assert document["count"] == 719 and document["corpus"]["parts"] == 4 and document["modality"] == "image"
    queries = sorted((digits / "photos").rglob("*.png"))[::24]  # 30 queries over every class
    results = _search(capsys, out, [str(q) for q in queries])
    agree = []
    for query, result in zip(queries, results, strict=True):
        top = result["results"]
        assert top[0]["key"] == str(query.relative_to(digits / "photos")) and top[0]["score"] > 0.999
        assert top[0]["label"] == query.parent.name and [hit["rank"] for hit in top] == list(range(1, 11))
        agree += [hit["label"] == query.parent.name for hit in top[1:]]
    # Neighbours of the same digit: 10 % by chance (what shuffled labels would give); this model measured 0.985.
    assert np.mean(agree) > 0.8
    capsys.readouterr()
    assert twinscale(["search", str(out), str(queries[0]), "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["rank", "key", "score", "label"] and table[2].split()[0] == "1"


def test_ivf_and_hnsw_reuse_the_parts_and_recall_the_exact_neighbours(digits: Path) -> None:
    from trainer.search import Searcher

    out = digits / "index-approx"
    _index(digits / "runs" / "digits", digits / "photos", out, "--part-size", "200")
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    queries = [str(q) for q in sorted((digits / "photos").rglob("*.png"))[::7]]
    exact = [[hit.key for hit in hits] for hits in Searcher(out).search(queries, 10)]
    for kind in ("ivf", "hnsw"):
        _index(digits / "runs" / "digits", digits / "photos", out, "--part-size", "200", "--index", kind)
        assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == parts  # nothing re-embedded
        searcher = Searcher(out)
        assert searcher.document["index"]["type"] == kind
        found = [[hit.key for hit in hits] for hits in searcher.search(queries, 10)]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found, strict=True)])
        assert recall >= 0.9, (kind, recall)


@pytest.mark.slow
def test_an_interrupted_index_resumes_without_embedding_finished_parts_again(digits: Path) -> None:
    import signal
    import time

    photos, out = digits / "photos", digits / "index-resumed"
    command = [sys.executable, "-m", "launch.cli", "index", str(digits / "runs" / "digits"), str(photos), "--out",
               str(out), "--part-size", "1"]  # 719 parts: time to interrupt it in the middle
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and len(list((out / "parts").glob("part-*.npz"))) < 20:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err[-2000:]
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.npz")}
    assert 20 <= len(finished) < 719 and not (out / "index.json").exists()
    _index(digits / "runs" / "digits", photos, out, "--part-size", "1")
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.npz")}
    assert {name: after[name] for name in finished} == finished and len(after) == 719  # only the rest embedded
    whole = digits / "index-whole"
    _index(digits / "runs" / "digits", photos, whole, "--part-size", "1")
    keys, vectors = _vectors(out)
    whole_keys, whole_vectors = _vectors(whole)
    assert list(keys) == list(whole_keys) and np.array_equal(vectors, whole_vectors)


def test_index_refuses_other_models_foreign_dirs_and_bad_queries(
        digits: Path, glyphs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "index"
    _index(digits / "runs" / "digits", digits / "photos", out, "--part-size", "400")
    message = _error(capsys, ["index", str(glyphs / "runs" / "glyphs"), str(digits / "photos"), "--out", str(out),
                              "--part-size", "400"])
    assert "another" in message and "weights_sha256" in message and "new --out" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not part of a twinscale index" in _error(
        capsys, ["index", str(digits / "runs" / "digits"), str(digits / "photos"), "--out", str(tmp_path / "other")])
    assert "no such index directory" in _error(capsys, ["search", str(tmp_path / "missing"), "a"])
    assert "not a twinscale index" in _error(capsys, ["search", str(tmp_path / "other"), "a"])
    assert "empty query" in _error(capsys, ["search", str(out), ""])
    assert "text query" in _error(capsys, ["search", str(out), "a three"])  # the digits CNN reads images only
    assert "no such image file" in _error(capsys, ["search", str(out), str(tmp_path / "gone.png")])
    document = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**document, "weights_sha256": "0" * 64}))  # the model changed since
    assert "rebuild the index" in _error(capsys, ["search", str(out), str(next((digits / "photos").rglob("*.png")))])
    assert "--side b" in _error(capsys, ["index", str(glyphs / "runs" / "glyphs"), str(digits / "photos"),
                                         "--out", str(tmp_path / "side"), "--side", "b"])


def test_text_to_image_search_with_a_clip_model(glyphs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import unicodedata

    out = glyphs / "index-images"
    _index(glyphs / "runs" / "glyphs", glyphs / "glyphs" / "images" / "test", out)
    document = json.loads((out / "index.json").read_text())
    assert document["side"] == "a" and document["modality"] == "image"  # the image tower embeds the corpus
    per_class = document["count"] // 26
    names = [unicodedata.name(char).lower() for char in fonts.LATIN[:26]]
    results = _search(capsys, out, names, k=per_class)
    hits = [hit["label"] == f"U+{ord(char):04X}" for char, result in zip(fonts.LATIN[:26], results, strict=True)
            for hit in result["results"]]
    # Chance: 1/26 ≈ 0.04 (an untrained pair of towers scores about that); this run measured ~0.7.
    assert np.mean(hits) > 0.4


def test_text_corpus_finds_its_own_line_first(glyphs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import unicodedata

    names = [unicodedata.name(char).lower() for char in fonts.LATIN[:26]]
    corpus = glyphs / "names.jsonl"
    corpus.write_text("".join(json.dumps({"text": name, "key": f"U+{ord(c):04X}", "label": name.split()[1]}) + "\n"
                              for c, name in zip(fonts.LATIN[:26], names, strict=True)))
    out = glyphs / "index-names"
    _index(glyphs / "runs" / "glyphs", corpus, out, "--part-size", "10")
    document = json.loads((out / "index.json").read_text())
    assert document["side"] == "b" and document["corpus"]["parts"] == 3 and document["texts"]
    for name, result in zip(names, _search(capsys, out, names, k=3), strict=True):
        first = result["results"][0]
        assert first["text"] == name and first["score"] > 0.999 and first["label"] == "capital"
    # An image query goes through the image tower (image → name search).
    image = sorted((glyphs / "glyphs" / "images" / "test" / "U+0041").glob("*.png"))[0]
    assert _search(capsys, out, [str(image)], k=26)[0]["results"][0]["key"].startswith("U+")


def test_a_text_model_finds_a_line_of_its_corpus_first(texts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = texts / "index"
    _index(texts / "runs" / "text", texts / "lines.txt", out, "--part-size", "30")
    document = json.loads((out / "index.json").read_text())
    assert document["side"] == "a" and document["modality"] == "text" and document["corpus"]["parts"] == 3
    lines = (texts / "lines.txt").read_text().splitlines()
    queries = lines[::7]
    for query, result in zip(queries, _search(capsys, out, queries, k=5), strict=True):
        first = result["results"][0]
        assert first["text"] == query and first["key"] == f"{lines.index(query):08d}" and first["score"] > 0.999
    image = texts / "query.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    assert "reads text inputs only" in _error(capsys, ["search", str(out), str(image)])


def test_verify_decides_held_out_pairs_at_the_held_out_threshold(digits: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from trainer.data.shardsets import open_data
    from trainer.embed import load_model, shard_preprocessors
    from trainer.engine.evaluate import embed_split
    from trainer.verification import heldout_pairs

    run = digits / "runs" / "digits"
    by_class = {folder.name: sorted(folder.glob("*.png")) for folder in sorted((digits / "photos").iterdir())}
    same = [(by_class[name][0], by_class[name][1]) for name in by_class]
    names = list(by_class)
    different = [(by_class[a][0], by_class[b][0]) for a, b in zip(names, names[1:] + names[:1], strict=True)]
    decided = []
    for pair, expected in [(pair, True) for pair in same] + [(pair, False) for pair in different]:
        capsys.readouterr()
        assert twinscale(["verify", str(run), str(pair[0]), str(pair[1]), "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        decided.append(answer["same"] == expected)
    assert np.mean(decided) >= 0.8  # held-out accuracy at the threshold measured ~0.94
    model, _, cfg = load_model(run)
    share = embed_split(model, str(cfg.data.test), cfg, torch.device("cpu"),
                        preprocessors=shard_preprocessors(model, cfg, open_data(str(cfg.data.test), cfg.data)))
    pairs = heldout_pairs(share)
    assert pairs is not None and answer["threshold"] == pytest.approx(pairs.threshold)
    assert answer["heldout_accuracy"] == pytest.approx(pairs.accuracy)
    cache = json.loads((run / "verification.json").read_text())
    assert cache["threshold"] == pytest.approx(pairs.threshold)
    (run / "verification.json").write_text(json.dumps({**cache, "threshold": 0.5}))  # the cache is what is read
    capsys.readouterr()
    assert twinscale(["verify", str(run), str(same[0][0]), str(same[0][1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.5
    (run / "verification.json").write_text(json.dumps({**cache, "weights_sha256": "old", "threshold": 0.5}))
    assert twinscale(["verify", str(run), str(same[0][0]), str(same[0][1]), "--json"]) == 0  # recomputed
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(pairs.threshold)
    assert "side b" in _error(capsys, ["verify", str(run), str(same[0][0]), "a text"])


def test_verify_an_image_against_its_name_with_two_towers(glyphs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = glyphs / "runs" / "glyphs"
    image = sorted((glyphs / "glyphs" / "images" / "test" / "U+0041").glob("*.png"))[0]
    # Its held-out captions are all matching pairs: the threshold is chosen against other glyphs' names (see
    # verification.py). Each of 8 held-out glyphs with its own name (same) and the next letter's (different).
    letters = fonts.LATIN[:26:3]
    right = 0
    for i, letter in enumerate(letters):
        glyph = sorted((glyphs / "glyphs" / "images" / "test" / f"U+{ord(letter):04X}").glob("*.png"))[0]
        for name, same in ((unicodedata.name(letter).lower(), True),
                           (unicodedata.name(letters[i - 1]).lower(), False)):
            assert twinscale(["verify", str(run), str(glyph), name, "--json"]) == 0
            decided = json.loads(capsys.readouterr().out)
            right += decided["same"] == same
    assert decided["heldout_accuracy"] > 0.7 and right >= 0.75 * 2 * len(letters), (right, decided)  # chance: 0.5
    scores = {}
    for name in ("latin capital letter a", "latin capital letter z"):
        assert twinscale(["verify", str(run), str(image), name, "--threshold", "0.3", "--json"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["score"]
    assert scores["latin capital letter a"] > scores["latin capital letter z"]
    assert twinscale(["verify", str(run), str(image), "x", "--threshold", "2"]) == 0
    assert capsys.readouterr().out.startswith("different: cosine")


@pytest.mark.slow
def test_ray_workers_build_the_same_index_as_one_process(digits: Path) -> None:
    one, two = digits / "index-one", digits / "index-ray"
    _index(digits / "runs" / "digits", digits / "shards" / "test", one)
    _index(digits / "runs" / "digits", digits / "shards" / "test", two, "--workers", "2")
    keys, vectors = _vectors(one)
    ray_keys, ray_vectors = _vectors(two)
    assert len(keys) == 719 and list(keys) == list(ray_keys)
    np.testing.assert_allclose(vectors, ray_vectors, atol=1e-5)
    assert json.loads((one / "index.json").read_text())["corpus"]["parts"] == 6  # one part per shard
