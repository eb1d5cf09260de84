"""Pretrained vision towers (trainer/models/vision.py): tiny random ViT, ResNet and CLIP vision models saved with
save_pretrained (+ their image processors) in temporary directories, loaded through the same path as real weights;
pooled features per model type, the processor's size and mean/std (read from its JSON, never run), and the
image preprocessing a `model.encoder: hf` vision tower gets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import config
from trainer.data.formats import ViewSpec
from trainer.data.transforms import IMAGENET_MEAN, ImagePreprocessor
from trainer.data.writer import write_shards
from trainer.errors import ConfigError
from trainer.models.towers import InputSpec, build_model, image_preprocessor
from trainer.models.vision import HFVisionEncoder, image_settings

transformers = pytest.importorskip("transformers")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
             "image_size": 32, "patch_size": 8}
    models = {
        "vit": (transformers.ViTModel(transformers.ViTConfig(**small)),
                transformers.ViTImageProcessor(size={"height": 32, "width": 32})),
        "clip": (transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small)),
                 transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})),
        "resnet": (transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12],
                                                                      depths=[1, 1])), None),
        "bert": (transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=37)), None),
    }
    paths = {}
    for name, (model, processor) in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        if processor is not None:
            processor.save_pretrained(paths[name])
    return paths


def test_pooled_features_per_model_type(vision_models: dict[str, Path]) -> None:
    images = torch.randn(2, 3, 32, 32)
    vit = HFVisionEncoder(str(vision_models["vit"])).eval()
    reference = transformers.ViTModel.from_pretrained(vision_models["vit"], add_pooling_layer=False).eval()
    with torch.no_grad():  # ViT: the CLS token of the last (layer-normed) hidden states, not the untrained pooler
        assert torch.allclose(vit(images), reference(pixel_values=images).last_hidden_state[:, 0], atol=1e-6)
        assert vit.out_dim == 32 and vit(torch.randn(1, 3, 48, 48)).shape == (1, 32)  # other sizes: interpolated
    clip = HFVisionEncoder(str(vision_models["clip"])).eval()
    reference = transformers.CLIPVisionModel.from_pretrained(vision_models["clip"]).eval()
    with torch.no_grad():  # CLIP: its pooler output (the post-layer-normed CLS)
        assert torch.allclose(clip(images), reference(pixel_values=images).pooler_output, atol=1e-6)
    resnet = HFVisionEncoder(str(vision_models["resnet"])).eval()
    reference = transformers.ResNetModel.from_pretrained(vision_models["resnet"]).eval()
    with torch.no_grad():  # ResNet: global average pool of the last stage, flattened
        assert resnet.out_dim == 12
        assert torch.allclose(resnet(images), reference(pixel_values=images).pooler_output.flatten(1), atol=1e-6)


def test_image_settings_come_from_the_processor_config(vision_models: dict[str, Path]) -> None:
    assert image_settings(str(vision_models["vit"])) == (32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    size, mean, _ = image_settings(str(vision_models["clip"]))
    assert size == 32 and mean == pytest.approx(CLIP_MEAN)  # the centre-crop size, not the resize edge
    assert image_settings(str(vision_models["resnet"])) == (224, IMAGENET_MEAN, (0.229, 0.224, 0.225))


def test_a_text_model_is_not_a_vision_tower(vision_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.pretrained: .*bert: BertModel is not a vision model"):
        HFVisionEncoder(str(vision_models["bert"]))
    with pytest.raises(ConfigError, match="model.pretrained: .*cannot load a vision model"):
        HFVisionEncoder(str(tmp_path))


def test_hf_towers_get_the_processors_preprocessing(vision_models: dict[str, Path]) -> None:
    cfg = config.load(None, ["model.encoder=hf", f"model.pretrained={vision_models['clip']}"])
    pre = image_preprocessor(cfg.model, cfg.data, ViewSpec("jpg", (3,)), "input")
    assert isinstance(pre, ImagePreprocessor) and pre.output_shape == (3, 32, 32)
    assert pre.mean == pytest.approx(CLIP_MEAN) and pre.resize == 37
    cfg = config.load(None, ["model.encoder=hf", f"model.pretrained={vision_models['clip']}", "data.image.size=48",
                             "data.image.mean=[0.5]", "data.image.std=[0.25]", "data.image.flip=false"])
    pre = image_preprocessor(cfg.model, cfg.data, ViewSpec("png", (1,)), "input")
    assert isinstance(pre, ImagePreprocessor)
    assert (pre.size, pre.channels, pre.mean, pre.std, pre.flip) == (48, 3, (0.5,) * 3, (0.25,) * 3, False)


def test_a_vision_tower_trains_with_gradient_checkpointing(vision_models: dict[str, Path]) -> None:
    cfg = config.load(None, ["model.encoder=hf", f"model.pretrained={vision_models['vit']}", "model.embedding_dim=8",
                             "model.gradient_checkpointing=true"]).model
    model = build_model(cfg, InputSpec("image", (3, 32, 32))).train()
    embeddings = model(torch.randn(3, 3, 32, 32))
    assert embeddings.shape == (3, 8)
    embeddings.sum().backward()
    encoder = model.tower_a.encoder
    assert getattr(encoder.model, "is_activation_checkpointing", None) or encoder.model.is_gradient_checkpointing
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_a_vision_run_plan_on_any_size_photos_and_its_export(vision_models: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from trainer.engine.build import plan_run
    from trainer.models.export import export_model, load_exported

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(4):
            size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                tmp_path / "photos" / label / f"{i}.png")
    write_shards(str(tmp_path / "photos"), "labeled", tmp_path / "shards")
    pretrained = tmp_path / "vit"  # a copy, removed after the export: the export must not need it
    shutil.copytree(vision_models["vit"], pretrained)
    cfg = config.load(None, [f"data.train={tmp_path / 'shards'}", "data.test=null", "data.batch_size=4",
                             "dist.workers=1", "model.encoder=hf", f"model.pretrained={pretrained}",
                             "model.embedding_dim=null"])
    plan = plan_run(cfg)
    pre = plan.preprocessors["input"]
    assert plan.spec_a.shape == (3, 32, 32) and isinstance(pre, ImagePreprocessor) and pre.mean == (0.5,) * 3
    model = build_model(cfg.model, plan.spec_a).eval()
    export_model(model, cfg.model, plan.spec_a, None, tmp_path / "model", preprocessors=plan.preprocessors)
    shutil.rmtree(pretrained)
    rebuilt, _ = load_exported(tmp_path / "model")
    assert rebuilt.preprocessing["a"].to_dict() == pre.to_dict()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), model(images), atol=1e-6)
        assert rebuilt(images).shape == (2, 32)  # no head: the backbone's width
        # The saved tower is a plain transformers model with its image processor, as save_pretrained writes it.
        saved = transformers.AutoModel.from_pretrained(tmp_path / "model" / "tower_a_vision").eval()
        assert torch.allclose(saved(pixel_values=images).last_hidden_state[:, 0],
                              model.tower_a.encoder(images), atol=1e-6)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "model" / "tower_a_vision")
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]


def test_dinov2_convnext_siglip_and_a_full_clip_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
             "image_size": 32, "patch_size": 8}
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=small, text_config={**small, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1},
        projection_dim=16))
    models = {
        "dinov2": (transformers.Dinov2Model(transformers.Dinov2Config(**small)), "pooler_output", 32),
        "convnext": (transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                                                            num_stages=2)), "pooler_output", 16),
        "siglip": (transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small)), "pooler_output", 32),
        "clip-full": (clip, None, 32),
    }
    images = torch.randn(2, 3, 32, 32)
    for name, (model, output, width) in models.items():
        model.save_pretrained(tmp_path / name)
        encoder = HFVisionEncoder(str(tmp_path / name)).eval()
        assert encoder.out_dim == width, name
        with torch.no_grad():
            if output is None:  # a full CLIP checkpoint: its vision tower's pooled output
                expected = clip.vision_model.eval()(pixel_values=images).pooler_output
            else:
                expected = getattr(model.eval()(pixel_values=images), output).flatten(1)
            assert torch.allclose(encoder(images), expected, atol=1e-5), name
