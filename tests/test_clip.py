"""`loss.name: clip`: CLIP's symmetric InfoNCE with a learnable temperature, against brute force.

The reference is plain torch cross-entropy on the whole (pairs × pairs) logit matrix: open_clip's formula when
every pair is similar and nothing repeats, the same with the excluded candidates masked out otherwise. The
objective must equal it on one process (chunked or not, with memory) and, in gradients of the towers and of
logit_scale, on 2 and 3 real gloo processes each holding a slice of the pairs (with and without memory).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawned import run_ranks

from trainer import config
from trainer.config import LossConfig, MiningConfig
from trainer.errors import ConfigError
from trainer.objectives.gather import Collective, ProcessGroupCollective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.objective import MetricObjective

PAIRS, DIM = 12, 5


class TwoTowers(torch.nn.Module):
    """Two linear towers and CLIP's logit_scale: a pseudo-Siamese model in miniature."""

    def __init__(self, seed: int, logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tower_a, self.tower_b = torch.nn.Linear(DIM, 4), torch.nn.Linear(DIM, 4)
        with torch.no_grad():
            for param in [*self.tower_a.parameters(), *self.tower_b.parameters()]:
                param.copy_(torch.randn(param.shape, generator=gen))
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))

    def embed(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.tower_a(a), dim=1), F.normalize(self.tower_b(b), dim=1)


def make_pairs(case: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs and labels of PAIRS pairs. `plain`: all similar, all distinct (open_clip's setting); `duplicates`:
    dissimilar pairs, items repeated across the batch (and across ranks), a class shared by several pairs."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(PAIRS, DIM, generator=gen), torch.randn(PAIRS, DIM, generator=gen)
    similar = torch.ones(PAIRS, dtype=torch.bool)
    pair = torch.arange(PAIRS)
    class_a, class_b = 2 * pair, 2 * pair
    content_a, content_b = 1000 + pair, 2000 + pair
    if case == "duplicates":
        similar[[3, 8]] = False
        class_b[similar.logical_not()] += 1
        for source, copy in ((0, 11), (5, 6)):  # one image in two pairs: (q, d1), (q, d2)
            a[copy], content_a[copy] = a[source], content_a[source]
        for source, copy in ((1, 10), (4, 9)):  # one caption in two pairs
            b[copy], content_b[copy] = b[source], content_b[source]
        class_a[7], class_b[7] = class_a[2], class_b[2]  # pairs 2 and 7 of one class: not each other's negatives
    return {"a": a, "b": b, "similar": similar, "labels_a": torch.stack([class_a, content_a], dim=1),
            "labels_b": torch.stack([class_b, content_b], dim=1)}


def reference_loss(model: TwoTowers, data: dict[str, torch.Tensor],
                   memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Brute force on the whole matrix: F.cross_entropy over rows and over columns of the masked logits."""
    emb_a, emb_b = model.embed(data["a"], data["b"])
    la, lb = data["labels_a"], data["labels_b"]
    mem_a = mem_b = torch.zeros(0, emb_a.shape[1])
    mem_la = mem_lb = torch.zeros(0, 2, dtype=torch.long)
    if memory is not None:
        mem_a, mem_la, mem_b, mem_lb = memory
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    sim = data["similar"]
    target = torch.arange(PAIRS)

    def direction(anchors, anchor_labels, candidates, candidate_labels):
        logits = scale * anchors @ torch.cat([candidates[:PAIRS], candidates[PAIRS:]]).T
        target_content = candidate_labels[:PAIRS, 1]
        allowed = ((candidate_labels[None, :, 0] != anchor_labels[:, None, 0])
                   & (candidate_labels[None, :, 1] != anchor_labels[:, None, 1])
                   & (candidate_labels[None, :, 1] != target_content[:, None]))
        allowed[target, target] = True
        logits = logits.masked_fill(~allowed, -torch.inf)
        return F.cross_entropy(logits[sim], target[sim], reduction="sum")

    rows = direction(emb_a, la, torch.cat([emb_b, mem_b]), torch.cat([lb, mem_lb]))
    columns = direction(emb_b, lb, torch.cat([emb_a, mem_a]), torch.cat([la, mem_la]))
    return (rows + columns) / (2 * sim.sum())


def open_clip_loss(model: TwoTowers, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """open_clip's ClipLoss on one process: (CE(logits, arange) + CE(logitsᵀ, arange)) / 2."""
    emb_a, emb_b = model.embed(data["a"], data["b"])
    logits = model.logit_scale.clamp(max=math.log(100)).exp() * emb_a @ emb_b.T
    target = torch.arange(PAIRS)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def local_batch(model: TwoTowers, data: dict[str, torch.Tensor], rows: slice
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """A worker's batch as the trainer lays it out: [a; b] embeddings, [N, 2] labels, explicit pair tuples."""
    emb_a, emb_b = model.embed(data["a"][rows], data["b"][rows])
    similar = data["similar"][rows]
    first = torch.arange(len(similar))
    explicit = (first[similar], first[similar] + len(first), first[~similar], first[~similar] + len(first))
    return torch.cat([emb_a, emb_b]), torch.cat([data["labels_a"][rows], data["labels_b"][rows]]), explicit


def clip_objective(chunk_entries: int = 2**22, collective: Collective | None = None,
                   memory: MemoryBank | None = None) -> MetricObjective:
    return MetricObjective(LossConfig(name="clip", chunk_entries=chunk_entries), MiningConfig(name="none"),
                           collective or Collective(), memory)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["plain", "duplicates"])
@pytest.mark.parametrize("chunk_entries", [2**22, 7, 1])
def test_one_process_equals_brute_force(case: str, chunk_entries: int) -> None:
    data = make_pairs(case)
    model = TwoTowers(seed=1)
    expected = reference_loss(model, data)
    if case == "plain":  # the masked reference is open_clip's loss where nothing is masked
        torch.testing.assert_close(expected, open_clip_loss(model, data))
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()
    embeddings, labels, explicit = local_batch(model, data, slice(None))
    out = clip_objective(chunk_entries)(embeddings, labels, explicit, logit_scale=model.logit_scale)
    out.local_share.backward()
    torch.testing.assert_close(out.loss, expected.detach())
    torch.testing.assert_close(out.local_share.detach(), expected.detach())
    assert model.logit_scale.grad is not None and float(model.logit_scale.grad) != 0.0
    for got, want in zip(grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert out.stats["pairs"] == float(data["similar"].sum())
    assert out.stats["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_duplicates_change_the_loss() -> None:
    """The masking is not a no-op: counting duplicates and same-class pairs as negatives gives another loss."""
    data = make_pairs("duplicates")
    model = TwoTowers(seed=1)
    embeddings, labels, explicit = local_batch(model, data, slice(None))
    masked = clip_objective()(embeddings, labels, explicit).loss
    labels = labels.clone()
    labels[:, 0] = torch.arange(2 * PAIRS)  # every item its own class
    labels[:, 1] = torch.arange(2 * PAIRS)  # and its own content
    assert abs(float(clip_objective()(embeddings, labels, explicit).loss) - float(masked)) > 1e-3


def test_logit_scale_is_clamped_at_log_100() -> None:
    data = make_pairs("plain")
    model = TwoTowers(seed=1, logit_scale=math.log(100) + 0.5)
    embeddings, labels, explicit = local_batch(model, data, slice(None))
    out = clip_objective()(embeddings, labels, explicit, logit_scale=model.logit_scale)
    out.local_share.backward()
    assert out.stats["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    assert float(model.logit_scale.grad) == 0.0
    torch.testing.assert_close(out.loss, reference_loss(model, data).detach())


def test_cross_batch_memory_adds_banked_rows_of_the_other_side() -> None:
    """A banked past batch: its b's are candidates of the rows, its a's of the columns (no gradient)."""
    data, past = make_pairs("duplicates"), make_pairs("plain", seed=5)
    model = TwoTowers(seed=1)
    memory = MemoryBank(size=100)
    objective = clip_objective(chunk_entries=9, memory=memory)
    with torch.no_grad():
        objective(*local_batch(model, past, slice(None)))
    objective.commit_memory()
    assert memory.labels.shape == (2 * PAIRS, 3) and memory.labels[:, 2].tolist() == [0] * PAIRS + [1] * PAIRS
    with torch.no_grad():
        past_a, past_b = model.embed(past["a"], past["b"])
    expected = reference_loss(model, data, (past_a, past["labels_a"], past_b, past["labels_b"]))
    expected.backward()
    expected_grads = grads(model)
    model.zero_grad()
    out = objective(*local_batch(model, data, slice(None)), logit_scale=model.logit_scale)
    out.local_share.backward()
    torch.testing.assert_close(out.loss, expected.detach())
    for got, want in zip(grads(model), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _worker(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    collective = ProcessGroupCollective()
    local = PAIRS // world
    rows = slice(rank * local, (rank + 1) * local)
    for case in ("plain", "duplicates", "duplicates+memory"):
        data = make_pairs(case.split("+")[0])
        model = TwoTowers(seed=2)
        objective = clip_objective(chunk_entries=10, collective=collective,
                                   memory=MemoryBank(size=100) if "memory" in case else None)
        banked = None
        if objective.memory is not None:  # bank a past global batch, each rank its slice of it
            past = make_pairs("plain", seed=5)
            with torch.no_grad():
                objective(*local_batch(model, past, rows))
                past_a, past_b = model.embed(past["a"], past["b"])
            objective.commit_memory()
            banked = (past_a, past["labels_a"], past_b, past["labels_b"])
        expected = reference_loss(model, data, banked)
        expected.backward()
        expected_grads = grads(model)
        model.zero_grad()
        embeddings, labels, explicit = local_batch(model, data, rows)
        out = objective(embeddings, labels, explicit, logit_scale=model.logit_scale)
        (out.local_share * world).backward()
        for param in model.parameters():  # data-parallel training averages gradients
            dist.all_reduce(param.grad)
            param.grad /= world
        torch.testing.assert_close(out.loss, expected.detach(), msg=lambda m, c=case: f"{c}: {m}")
        for got, want in zip(grads(model), expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{c}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_workers_match_one_process_on_the_whole_batch(world: int) -> None:
    run_ranks(_worker, world)


CLIP = ["loss.name=clip", "data.source_kind=pairs"]


@pytest.mark.parametrize(("overrides", "key"), [
    (["mining.name=batch_hard"], "mining.name"),
    (["loss.distance=euclidean"], "loss.distance"),
    (["data.source_kind=labeled"], "data.source_kind"),
    (["loss.clip_temperature=0.001"], "loss.clip_temperature"),
])
def test_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        config.load(None, CLIP + overrides)


def test_clip_config_loads() -> None:
    cfg = config.load(None, [*CLIP, "mining.memory_size=64"])
    assert cfg.loss.clip_temperature == 0.07


def test_logit_scale_is_a_model_parameter_saved_and_reloaded() -> None:
    """The towers' model owns logit_scale (so DeepSpeed optimises and checkpoints it); a model rebuilt from its
    config (export, embed) takes it back from the weights, strictly."""
    from trainer.config import ModelConfig
    from trainer.models.towers import InputSpec, build_model

    spec = InputSpec("vector", (DIM,))
    model = build_model(ModelConfig(hidden_dims=[8], embedding_dim=4), spec)
    assert model.logit_scale is None and "logit_scale" not in model.state_dict()
    model.add_logit_scale(math.log(1 / 0.07))
    assert any(p is model.logit_scale for p in model.parameters())
    with torch.no_grad():
        model.logit_scale.fill_(3.5)
    rebuilt = build_model(ModelConfig(hidden_dims=[8], embedding_dim=4), spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.logit_scale is not None and float(rebuilt.logit_scale.detach()) == 3.5


def test_logit_scale_is_never_weight_decayed() -> None:
    """AdamW decays the towers' weights but not clip's temperature (it would drift towards T = 1)."""
    from trainer.config import ModelConfig
    from trainer.models.params import param_groups
    from trainer.models.towers import InputSpec, build_model

    model = build_model(ModelConfig(hidden_dims=[8], embedding_dim=4), InputSpec("vector", (DIM,)))
    model.add_logit_scale(math.log(1 / 0.07))
    groups = param_groups(model, 1e-3, {"tower_a.head.*": 1e-2})
    exempt = [g for g in groups if any(p is model.logit_scale for p in g["params"])]
    assert len(exempt) == 1 and exempt[0]["params"] == [model.logit_scale] and exempt[0]["weight_decay"] == 0.0
    assert exempt[0]["lr"] == 1e-3 and all("weight_decay" not in g for g in groups if g is not exempt[0])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    before = float(model.logit_scale.detach())
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.5)
    model.logit_scale.grad = torch.zeros_like(model.logit_scale)
    optimizer.step()
    assert float(model.logit_scale.detach()) == before  # no gradient, no decay: unchanged


WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "mirror", "garden", "rocket", "candle", "forest",
         "bridge", "wallet", "ladder", "pepper", "violin", "castle", "needle", "saddle", "anchor", "harbor",
         "jacket", "meadow", "tunnel"]


@pytest.mark.slow
def test_clip_trains_two_text_towers_under_torchrun(tmp_path) -> None:
    """Text pairs (a phrase ↔ its word in capitals: no shared n-gram), two towers, clip with the feature cache on
    2 torchrun workers: held-out retrieval far above the step-0 baseline, logit_scale learned, exported and
    checkpointed (a resumed run equals the uninterrupted one)."""
    import json
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    rows = ["a,b,similar"] + [f"{word} {variant},{word.upper()},1" for variant in range(6) for word in WORDS]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    env = {**__import__("os").environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "launch.cli", "shards", "pairs.csv", "--kind", "pairs", "--out",
                           "shards", "--test-fraction", "0.25", "--samples-per-shard", "27"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "clip.yaml").write_text(
        "name: clip\n"
        "data: {train: shards/train, test: shards/test, batch_size: 12, text_buckets: 4096}\n"
        "model: {architecture: pseudo_siamese, encoder: text, embedding_dim: 16}\n"
        "loss: {name: clip}\n"
        "mining: {name: none}\n"
        "optim: {epochs: 6, warmup_steps: 2, lr: 0.01, feature_cache: true, gradient_accumulation_steps: 2}\n"
        "checkpoint: {every_steps: 8, keep_last: 5}\n"
        "log: {wandb: false}\n")

    def train(*extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "trainer.train", "clip.yaml", *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    train()
    run = tmp_path / "runs" / "clip"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and len(evals) == 2
    start, final = evals[0], evals[-1]
    # Measured (seed 0) on the 36 held-out pairs: step 0 (untrained towers) a→b R@1 0.056, MRR@10 0.134, b→a
    # MRR@10 0.138; trained (24 steps) a→b R@1 1.0, b→a MRR@10 1.0 (b→a R@1 0.73: each word has several phrases,
    # and R@1 counts the share of them found at rank 1).
    assert start["retrieval_a2b/recall_at_1"] < 0.3 and start["retrieval_b2a/mrr_at_10"] < 0.5, start
    assert final["retrieval_a2b/recall_at_1"] > 0.8 and final["retrieval_b2a/mrr_at_10"] > 0.8, final
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert abs(float(weights["logit_scale"]) - math.log(1 / 0.07)) > 1e-3  # learned, and exported with the towers
    (tmp_path / "words.txt").write_text("APPLE\nRIVER\n")
    done = subprocess.run([sys.executable, "-m", "launch.cli", "embed", "runs/clip", "words.txt", "--out", "w.npz",
                           "--side", "b"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the exported model (with logit_scale) loads for inference
    # Resume from step 8 (logit_scale and Adam's state for it come back from the checkpoint): the same run, bit for
    # bit, and the step-0 evaluation is not repeated.
    shutil.copytree(run, tmp_path / "runs" / "again")
    for step in (16, 24):
        shutil.rmtree(tmp_path / "runs" / "again" / "checkpoints" / f"step_{step:08d}")
    (tmp_path / "runs" / "again" / "final_metrics.json").unlink()
    train("--set", "name=again", "--resume")
    for name in ("train_loss.jsonl", "metrics.jsonl"):
        assert (tmp_path / "runs" / "again" / name).read_text() == (run / name).read_text(), name
