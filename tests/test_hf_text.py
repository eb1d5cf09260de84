"""Pretrained Hugging Face text towers: loading (local directory, hub id, bad input), pooling, dynamic padding,
the tokenizer preprocessor, and the fine-tuning levers (freeze, per-group learning rates, gradient checkpointing,
LoRA). Tiny randomly initialised BERTs saved with save_pretrained stand in for real weights (same loading path)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.hf_models import save_tiny_bert
from trainer import config
from trainer.data.formats import KIND_VIEWS, ShardIndex, ViewSpec
from trainer.data.preprocess import SampleContext, preprocessor_from_dict
from trainer.data.tokenize import TokenizerPreprocessor
from trainer.errors import ConfigError
from trainer.models.params import param_groups
from trainer.models.towers import EmbeddingModel, InputSpec, build_model, build_preprocessors

TEXT = InputSpec("text", (), text_buckets=16)
TEXTS = ["the dog runs in the city", "a cat", "water and fire", "the small red car is on the road"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def _cfg(bert: Path, *overrides: str) -> config.Config:
    return config.load(None, ["model.encoder=hf", f"model.pretrained={bert}", *overrides])


def _batch(source: Path, texts: list[str], prompt: str = "", max_length: int = 32):
    pre = TokenizerPreprocessor(str(source), max_length, prompt)
    return pre.collate([pre.prepare(t.encode(), "txt", SampleContext(str(i))) for i, t in enumerate(texts)])


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "pooler"])
def test_text_tower_pools_right_padded_batches_like_single_texts(bert: Path, pooling: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(bert, f"model.pooling={pooling}", "model.embedding_dim=8").model, TEXT).eval()
    with torch.no_grad():
        together = model(_batch(bert, TEXTS))
        alone = torch.cat([model(_batch(bert, [text])) for text in TEXTS])
    assert together.shape == (4, 8)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing
    assert (together[0] - together[1]).abs().max() > 1e-3


def test_no_head_keeps_the_backbone_width_and_pools_as_specified(bert: Path) -> None:
    from transformers import AutoModel

    model = build_model(_cfg(bert, "model.embedding_dim=null", "model.pooling=mean").model, TEXT).eval()
    batch = _batch(bert, TEXTS)
    backbone = AutoModel.from_pretrained(bert).eval()
    with torch.no_grad():
        states = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)
        torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=1e-5)
    assert not any(name.startswith("tower_a.head") for name, _ in model.named_parameters())


def test_tokenizer_preprocessor_prompts_truncates_pickles_and_round_trips(bert: Path) -> None:
    pre = TokenizerPreprocessor(str(bert), 6, "query: ")
    assert pre.prepare(b"the dog", "txt", SampleContext("k")) == "query: the dog"
    batch = pre.collate(["query: dog", "query: the dog runs in the city of water"])
    assert batch.input_ids.shape == (2, 6) and batch.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch.rows(0, 1).input_ids.shape == (1, 5)  # trimmed to its own longest text
    copy = pickle.loads(pickle.dumps(pre))
    assert copy._tokenizer is None and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert torch.equal(copy.collate(["query: the dog"]).input_ids, pre.collate(["query: the dog"]).input_ids)
    again = preprocessor_from_dict(pre.to_dict())
    assert isinstance(again, TokenizerPreprocessor) and again.to_dict() == pre.to_dict()


def test_pair_views_get_the_tokenizer_with_their_sides_prompt(bert: Path) -> None:
    cfg = _cfg(bert, 'model.prompts={a: "query: ", b: "passage: "}', "model.max_length=12")
    index = ShardIndex("pairs", {v: ViewSpec("txt", None) for v in KIND_VIEWS["pairs"]}, False, None, ())
    chosen = build_preprocessors(cfg.model, cfg.data, index)
    assert {v: p.to_dict() for v, p in chosen.items()} == {
        "a": {"name": "tokenizer", "source": str(bert), "max_length": 12, "prompt": "query: "},
        "b": {"name": "tokenizer", "source": str(bert), "max_length": 12, "prompt": "passage: "}}


def test_bad_pretrained_fails_with_one_line_naming_the_key(bert: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [(f"model.pretrained={tmp_path / 'missing'}", "model.pretrained: "),
             (f"model.pretrained={tmp_path}", "no config.json"),
             ("model.pretrained=nobody/no-such-model-xyz", "HF_HUB_OFFLINE")]
    for override, message in cases:
        cfg = config.load(None, ["model.encoder=hf", override])
        with pytest.raises(ConfigError) as error:
            build_model(cfg.model, TEXT)
        assert message in str(error.value) and "\n" not in str(error.value) and "model.pretrained" in str(error.value)
    cfg = _cfg(bert, "model.encoder_b=hf", "model.architecture=pseudo_siamese",
               f"model.pretrained_b={tmp_path / 'gone'}")
    with pytest.raises(ConfigError, match="model.pretrained_b: "):
        build_model(cfg.model, TEXT, TEXT)
    with pytest.raises(ConfigError, match="model.pretrained: .* reads text inputs"):
        build_model(_cfg(bert).model, InputSpec("vector", (4,)))
    with pytest.raises(ConfigError, match="model.pretrained: model.encoder=hf needs"):
        config.load(None, ["model.encoder=hf"])


def test_freeze_and_lr_groups_shape_the_optimizer(bert: Path) -> None:
    cfg = _cfg(bert, "model.freeze=[tower_a.encoder.backbone.embeddings.*]")
    model = build_model(cfg.model, TEXT)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("tower_a.encoder.backbone.embeddings.") or ".pooler." in n for n in frozen)
    groups = param_groups(model, 1e-3, {"tower_a.encoder.*": 2e-5})
    assert [g["lr"] for g in groups] == [1e-3, 2e-5]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == {"tower_a.head.weight", "tower_a.head.bias"}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match=r"optim.lr_groups.tower_b\.\*: matches no trainable"):
        param_groups(model, 1e-3, {"tower_b.*": 1e-4})
    with pytest.raises(ConfigError, match="model.freeze: 'nothing.*' matches no parameter"):
        build_model(_cfg(bert, "model.freeze=[nothing.*]").model, TEXT)


def _loss_and_grads(model: EmbeddingModel, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(batch).pow(3).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(bert: Path) -> None:
    grads = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        model = build_model(_cfg(bert, f"model.gradient_checkpointing={flag}").model, TEXT).train()
        grads.append(_loss_and_grads(model, _batch(bert, TEXTS)))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_lora_trains_adapters_only_and_merges_into_the_backbone(bert: Path) -> None:
    torch.manual_seed(0)
    cfg = _cfg(bert, "model.lora={r: 4, alpha: 8, target_modules: [query, value]}")
    model = build_model(cfg.model, TEXT)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("tower_a.head.") for n in trainable)
    with torch.no_grad():  # B starts at zero: move it so the adapters change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    batch = _batch(bert, TEXTS)
    model.eval()
    with torch.no_grad():
        adapted = model(batch)
        merged = model.tower_a.encoder.merged_backbone()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        states = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1)
        expected = torch.nn.functional.normalize(model.tower_a.head(pooled), dim=1)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="model.lora: only hf towers"):
        config.load(None, ["model.lora={r: 4}"])


@pytest.mark.parametrize("overrides,message", [
    (["model.pretrained=nobody/no-such-model-xyz"], "model.pretrained: cannot load 'nobody/no-such-model-xyz'"),
    (["model.pooling=cls", "model.freeze=[nothing.*]"], "model.freeze: 'nothing.*' matches no parameter"),
    (['optim.lr_groups={"tower_b.*": 1.0e-5}'], "optim.lr_groups.tower_b.*: matches no trainable parameter"),
])
def test_twinscale_train_exits_2_before_anything_starts(bert: Path, tmp_path: Path, monkeypatch, capsys,
                                                        overrides: list[str], message: str) -> None:
    import json

    from launch.cli import main as twinscale
    from trainer.data.writer import write_shards

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"anchor": f"the {w}", "positive": w}) + "\n" for w in TEXTS))
    write_shards(str(source), "pairs", tmp_path / "shards", samples_per_shard=2)
    args = ["train"]
    for override in [f"data.train={tmp_path / 'shards'}", "data.test=null", f"output_dir={tmp_path / 'runs'}",
                     "name=bad", "dist.workers=1", "data.batch_size=2", "model.encoder=hf", f"model.pretrained={bert}",
                     *overrides]:
        args += ["--set", override]
    assert twinscale(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # libraries' warnings aside
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "runs").exists()
