"""Encoders, towers, build_model's config checks, and the exported inference model (safetensors + config.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig
from trainer.data.formats import TextBatch, hash_ngrams
from trainer.errors import CheckpointError, ConfigError
from trainer.models.encoders import CNNEncoder, MLPEncoder, TextEncoder
from trainer.models.export import export_model, load_exported
from trainer.models.towers import EmbeddingModel, InputSpec, build_model

BUCKETS, NGRAMS = 512, (1, 3)
TEXTS = ["a red shoe", "blue running shoes", "", "Ünïcode text"]
VECTOR = InputSpec("vector", (12,))
TEXT = InputSpec("text", (), text_buckets=BUCKETS)


def text_batch(texts: list[str] = TEXTS) -> TextBatch:
    return TextBatch.collate([hash_ngrams(text, BUCKETS, NGRAMS) for text in texts])


def assert_unit_rows(embeddings: torch.Tensor, batch: int, dim: int) -> None:
    assert embeddings.shape == (batch, dim)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(batch))


def test_encoders_report_their_output_width() -> None:
    assert MLPEncoder(12, (32, 16), 0.1)(torch.randn(5, 12)).shape == (5, 16)
    assert MLPEncoder(12, (), 0.0).out_dim == 12
    assert CNNEncoder(3, (8, 16, 4), 0.1)(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert TextEncoder(BUCKETS, 24)(text_batch()).shape == (len(TEXTS), 24)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 32, 32), (3, 32, 32), (3, 9, 13)])
def test_cnn_tower_gives_unit_embeddings_for_any_image_size(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="cnn", channels=(8, 16, 16), embedding_dim=10), InputSpec("image", shape))
    assert_unit_rows(model(torch.randn(4, *shape)), 4, 10)


def test_mlp_and_text_towers_give_unit_embeddings() -> None:
    torch.manual_seed(0)
    mlp = build_model(ModelConfig(encoder="mlp", hidden_dims=(32,), embedding_dim=6), VECTOR)
    assert_unit_rows(mlp(torch.randn(7, 12)), 7, 6)
    text = build_model(ModelConfig(encoder="text", text_dim=16, embedding_dim=6), TEXT)
    assert_unit_rows(text(text_batch()), len(TEXTS), 6)


def test_cnn_embedding_does_not_depend_on_the_rest_of_the_batch() -> None:
    # GroupNorm keeps items independent, so the embeddings of a global batch equal those of its slices.
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="cnn", channels=(8, 8)), InputSpec("image", (1, 8, 8))).train()
    images = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(model(images)[:2], model(images[:2]))


def test_siamese_shares_one_tower() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="siamese", hidden_dims=(16,)), VECTOR, VECTOR).eval()
    inputs = torch.randn(5, 12)
    assert model.is_siamese and model.tower_b is None
    torch.testing.assert_close(model(inputs, side="b"), model(inputs, side="a"))


def test_pseudo_siamese_towers_have_separate_parameters() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="pseudo_siamese", hidden_dims=(16,)), VECTOR).eval()
    assert not model.is_siamese and model.tower_b is not None
    ids_a = {id(p) for p in model.tower_a.parameters()}
    assert ids_a.isdisjoint(id(p) for p in model.tower_b.parameters())
    inputs = torch.randn(5, 12)
    assert not torch.allclose(model(inputs, side="a"), model(inputs, side="b"))


def test_pseudo_siamese_reads_image_on_side_a_and_text_on_side_b() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="pseudo_siamese", encoder="cnn", encoder_b="text", channels=(8,), embedding_dim=8)
    model = build_model(cfg, InputSpec("image", (3, 16, 16)), TEXT)
    assert_unit_rows(model(torch.randn(len(TEXTS), 3, 16, 16), side="a"), len(TEXTS), 8)
    assert_unit_rows(model(text_batch(), side="b"), len(TEXTS), 8)


def test_side_must_be_a_or_b() -> None:
    with pytest.raises(ValueError, match="side"):
        build_model(ModelConfig(), VECTOR)(torch.randn(2, 12), side="c")


@pytest.mark.parametrize(
    ("cfg", "spec_a", "spec_b", "message"),
    [
        (ModelConfig(encoder="cnn"), VECTOR, None,
         "model.encoder: cnn needs image inputs but the shards hold vector (npy) views; use model.encoder=mlp"),
        (ModelConfig(encoder="mlp"), TEXT, None, "model.encoder: mlp needs vector .* use model.encoder=text"),
        (ModelConfig(encoder="text"), InputSpec("image", (1, 8, 8)), None, "model.encoder: .*model.encoder=cnn"),
        (ModelConfig(architecture="pseudo_siamese", encoder="cnn"), InputSpec("image", (1, 8, 8)), TEXT,
         "model.encoder_b: cnn needs image inputs but side b .* use model.encoder_b=text"),
        (ModelConfig(architecture="pseudo_siamese", encoder_b="cnn"), VECTOR, VECTOR, "model.encoder_b: cnn"),
        (ModelConfig(architecture="siamese", encoder="mlp"), VECTOR, InputSpec("vector", (3,)),
         "model.architecture=pseudo_siamese"),
    ],
)
def test_encoder_modality_mismatch_names_the_key(cfg: ModelConfig, spec_a: InputSpec, spec_b: InputSpec | None,
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(cfg, spec_a, spec_b)


def test_input_spec_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        InputSpec("image", (8, 8))
    with pytest.raises(ValueError):
        InputSpec("text", ())
    assert InputSpec.from_dict(InputSpec("image", (1, 8, 8)).to_dict()) == InputSpec("image", (1, 8, 8))


def exported(tmp_path: Path) -> tuple[EmbeddingModel, Path]:
    """A pseudo-Siamese image/text model, exported to tmp_path/model."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="pseudo_siamese", encoder="cnn", encoder_b="text", channels=(8, 8),
                      dropout=0.2, embedding_dim=8)
    spec_a = InputSpec("image", (1, 8, 8))
    model = build_model(cfg, spec_a, TEXT)
    export_model(model, cfg, spec_a, TEXT, tmp_path / "model", extra={"text_ngrams": list(NGRAMS)})
    return model.eval(), tmp_path / "model"


def test_export_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    model, out_dir = exported(tmp_path)
    loaded, document = load_exported(out_dir)
    assert not loaded.training and document["extra"] == {"text_ngrams": [1, 3]}
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, side="a"), model(images, side="a"), rtol=0, atol=0)
        torch.testing.assert_close(loaded(text_batch(), side="b"), model(text_batch(), side="b"), rtol=0, atol=0)


def test_export_round_trip_of_a_siamese_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(hidden_dims=(16, 8))
    model = build_model(cfg, VECTOR).eval()
    export_model(model, cfg, VECTOR, None, tmp_path)
    loaded, _ = load_exported(tmp_path / "config.json")  # a file inside the directory works too
    inputs = torch.randn(4, 12)
    torch.testing.assert_close(loaded(inputs), model(inputs), rtol=0, atol=0)


def test_corrupt_weights_raise_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    _, out_dir = exported(tmp_path)
    weights = out_dir / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 32)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_exported(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    del config["weights_sha256"]  # without the checksum, safetensors itself must reject the file
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        load_exported(out_dir)


def test_mismatched_tensors_raise_checkpoint_error(tmp_path: Path) -> None:
    _, out_dir = exported(tmp_path)
    config = json.loads((out_dir / "config.json").read_text())
    config["model"]["embedding_dim"] = 5
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors.*do not match"):
        load_exported(out_dir)


@pytest.mark.parametrize("damage", ["missing", "not_json", "wrong_format", "bad_model_key"])
def test_bad_config_json_raises_checkpoint_error(tmp_path: Path, damage: str) -> None:
    _, out_dir = exported(tmp_path)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if damage == "missing":
        config_path.unlink()
    elif damage == "not_json":
        config_path.write_text("{")
    elif damage == "wrong_format":
        config_path.write_text(json.dumps({**config, "format": "something-else"}))
    else:
        config_path.write_text(json.dumps({**config, "model": {**config["model"], "encoder": "rnn"}}))
    with pytest.raises(CheckpointError, match="config.json"):
        load_exported(out_dir)


def test_exported_weights_are_not_pickles(tmp_path: Path) -> None:
    _, out_dir = exported(tmp_path)
    header_size = int(np.frombuffer((out_dir / "model.safetensors").read_bytes()[:8], dtype="<u8")[0])
    header = json.loads((out_dir / "model.safetensors").read_bytes()[8 : 8 + header_size])
    assert "tower_a.head.weight" in header and "tower_b.encoder.bag.weight" in header


DISTRIBUTED_IMPORT = re.compile(r"^\s*(import|from)\s+(deepspeed|ray|torch\.distributed)\b|torch\.distributed\.",
                                re.MULTILINE)


def test_models_never_import_distributed_code() -> None:
    # torch itself always loads torch.distributed, so check what *our* loaded modules import, by source.
    probe = (
        "import sys, trainer.models, trainer.models.encoders, trainer.models.towers, trainer.models.export\n"
        "print('deepspeed' in sys.modules, 'ray' in sys.modules)\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name == 'trainer' or name.startswith('trainer.'):\n"
        "        print(name, module.__file__)\n"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    flags, *loaded = output.splitlines()
    assert flags == "False False"
    files = dict(line.split(" ", 1) for line in loaded)
    assert {"trainer.models.towers", "trainer.models.export"} <= set(files)
    for name, path in files.items():
        assert not name.startswith(("trainer.engine", "trainer.objectives", "trainer.checkpoint")), name
        assert not DISTRIBUTED_IMPORT.search(Path(path).read_text()), f"{name} imports distributed code"
