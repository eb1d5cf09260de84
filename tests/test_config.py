"""Config validation: every bad input names the key and the file; overrides are typed; recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import config
from trainer.errors import ConfigError

RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe: Path) -> None:
    assert isinstance(config.load(recipe), config.Config)


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = config.load(None, ["loss.margin=0.3", "model.hidden_dims=[8, 4]", "log.wandb=false", "name=x"])
    assert cfg.loss.margin == 0.3 and cfg.model.hidden_dims == (8, 4) and cfg.log.wandb is False
    assert cfg.run_dir == Path("runs/x")


@pytest.mark.parametrize("override,expected", [
    ("loss.margni=0.3", "loss.margni: unknown key (did you mean margin?)"),
    ("optim.epochs=many", "optim.epochs: Input should be a valid integer"),
    ("log.wandb=maybe", "log.wandb: Input should be a valid boolean"),
    ("data.batch_size=1", "data.batch_size: Input should be greater than or equal to 2"),
    ("dist.zero_stage=3", "dist.zero_stage: Input should be less than or equal to 2"),
    ("loss.name=arcface", "loss.name: Input should be"),
    ("loss.name=supcon", "loss.distance: supcon is defined on cosine similarity"),
    ("optim.gradient_accumulation_steps=4", "optim.gradient_accumulation_steps: every supported loss uses in-batch"),
    ("model.encoder_b=text", "model.encoder_b: a siamese model has one shared tower"),
    ("unknown.key=1", "unknown: unknown key"),
])
def test_bad_values_name_the_key_and_file(override: str, expected: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss:\n  distance: euclidean\n" if "supcon" in override else "seed: 1\n")
    with pytest.raises(ConfigError) as error:
        config.load(recipe, [override])
    assert expected in str(error.value)
    assert str(recipe) in str(error.value)


@pytest.mark.parametrize("text,expected", [
    ("", "expected a mapping"), ("- a\n- b\n", "expected a mapping"), ("a: [", "not valid YAML"),
])
def test_bad_files(text: str, expected: str, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    if text == "":
        assert config.load(recipe).seed == 0  # an empty recipe means all defaults
        return
    with pytest.raises(ConfigError, match=expected):
        config.load(recipe)


def test_missing_file_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["loss.margin"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load(None, ["name=round", "model.channels=[8, 16]"])
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_every_field_is_documented() -> None:
    sections = [config.Config] + [f.annotation for f in config.Config.model_fields.values()
                                  if isinstance(f.annotation, type) and issubclass(f.annotation, config.Section)]
    for section in sections:
        for name, field in section.model_fields.items():
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, config.Section)):
                assert field.description, f"{section.__name__}.{name} has no docstring"


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, field in config.Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, config.Section):
            for sub in annotation.model_fields:
                assert f"`{name}.{sub}`" in readme, f"README lacks {name}.{sub}"
        else:
            assert f"`{name}`" in readme, f"README lacks {name}"


def test_feature_cache_allows_micro_batches() -> None:
    cfg = config.load(None, ["optim.feature_cache=true", "optim.gradient_accumulation_steps=4"])
    assert cfg.optim.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match="optim.gradient_accumulation_steps: 65 micro-batches cannot split"):
        config.load(None, ["optim.feature_cache=true", "optim.gradient_accumulation_steps=65"])


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    """A minimal recipe file, so that errors can be checked to name it."""
    path = tmp_path / "recipe.yaml"
    path.write_text("seed: 1\n")
    return path


@pytest.mark.parametrize("name,problem", [
    ("../../x", "holds a path separator"), ("a/b", "holds a path separator"), ("a\\b", "holds a path separator"),
    ("..", "starts with a dot"), (".hidden", "starts with a dot"), ("", "is empty"), ("' '", "is empty"),
    ('"a\\tb"', "holds control characters"),
])
def test_name_is_one_plain_path_component(name: str, problem: str, recipe_file: Path) -> None:
    with pytest.raises(ConfigError) as error:
        config.load(recipe_file, [f"name={name}"])
    assert f"{recipe_file}: name: " in str(error.value) and problem in str(error.value)
    with pytest.raises(ConfigError, match="output_dir: '' is empty"):
        config.load(recipe_file, ["output_dir="])
    assert config.load(recipe_file, ["name=digits-run.1_a"]).run_dir == Path("runs/digits-run.1_a")


@pytest.mark.parametrize("entry,expected", [
    ("{zero_optimization: {stage: 3}}",
     "dist.deepspeed.zero_optimization.stage: set by Twinscale; use dist.zero_stage"),
    ("{train_batch_size: 512}", "dist.deepspeed.train_batch_size: set by Twinscale; use data.batch_size"),
    ("{train_micro_batch_size_per_gpu: 8}", "dist.deepspeed.train_micro_batch_size_per_gpu: set by Twinscale"),
    ("{gradient_accumulation_steps: 4}", "use optim.gradient_accumulation_steps"),
    ("{fp16: {enabled: true}}", "dist.deepspeed.fp16: set by Twinscale; use dist.precision"),
    ("{bf16: {enabled: true}}", "dist.deepspeed.bf16: set by Twinscale; use dist.precision"),
    ("{optimizer: {type: SGD}}", "dist.deepspeed.optimizer: set by Twinscale; use optim.lr"),
    ("{scheduler: {type: WarmupLR}}", "dist.deepspeed.scheduler: set by Twinscale; use optim.warmup_steps"),
    ("{gradient_clipping: 5.0}", "use optim.grad_clip"),
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}",
     "dist.deepspeed.zero_optimization.offload_optimizer: not a tuning entry"),
    ("{activation_checkpointing: {}}", "dist.deepspeed.activation_checkpointing: not a tuning entry"),
    ("{zero_optimization: 2}", "dist.deepspeed.zero_optimization: expected a mapping"),
])
def test_deepspeed_extras_cannot_contradict_the_run_config(entry: str, expected: str, recipe_file: Path) -> None:
    with pytest.raises(ConfigError) as error:
        config.load(recipe_file, [f"dist.deepspeed={entry}"])
    assert expected in str(error.value) and str(recipe_file) in str(error.value)


def test_harmless_deepspeed_extras_reach_the_engine_config() -> None:
    import torch

    from trainer.engine.engine import deepspeed_config

    cfg = config.load(None, ["dist.zero_stage=2", "dist.deepspeed={zero_optimization: {reduce_bucket_size: 1000, "
                             "overlap_comm: true}, steps_per_print: 5}"])
    generated = deepspeed_config(cfg, 2, 10, torch.device("cpu"))
    assert generated["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}
    assert generated["steps_per_print"] == 5 and generated["train_batch_size"] == 128


def test_source_keys_mirror_the_shards_command() -> None:
    cfg = config.load(None, ["data.source_kind=pairs", "data.samples_per_shard=32", "data.pairs_per_item=3"])
    assert (cfg.data.source_kind, cfg.data.samples_per_shard, cfg.data.pairs_per_item) == ("pairs", 32, 3)
    with pytest.raises(ConfigError, match="data.source_kind: Input should be"):
        config.load(None, ["data.source_kind=quads"])
    with pytest.raises(ConfigError, match="data.samples_per_shard: Input should be greater than or equal to 1"):
        config.load(None, ["data.samples_per_shard=0"])
