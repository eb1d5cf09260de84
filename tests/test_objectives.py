"""The global-batch objective equals pytorch-metric-learning on one process, on 1, 2 and 3 real processes.

Multi-process cases use torch.distributed with gloo: each rank embeds its slice of one global batch, computes
its share, and the averaged parameter gradients (what DeepSpeed's data parallelism does) must equal the
gradients of one process running plain PML (default reducer) on the concatenated batch.
"""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pml_reference import pml_value

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.gather import Collective, ProcessGroupCollective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.objective import MetricObjective

LOSSES = {
    "contrastive": LossConfig(name="contrastive", distance="euclidean", pos_margin=0.1, neg_margin=1.2),
    "contrastive_cos": LossConfig(name="contrastive", distance="cosine", pos_margin=0.9, neg_margin=0.3),
    "triplet": LossConfig(name="triplet", distance="euclidean", margin=0.3),
    "triplet_l1": LossConfig(name="triplet", distance="l1", margin=0.5),
    "multi_similarity": LossConfig(name="multi_similarity"),
    "supcon": LossConfig(name="supcon", temperature=0.2),
    "infonce": LossConfig(name="infonce", temperature=0.2),
}
MINERS = ["none", "batch_hard", "semi_hard", "multi_similarity"]
GLOBAL_BATCH, DIM = 24, 8


def make_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny linear embedder and one global batch of inputs with 4 classes."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(DIM, 6)
    with torch.no_grad():
        model.weight.copy_(torch.randn(6, DIM, generator=gen))
        model.bias.copy_(torch.randn(6, generator=gen) * 0.1)
    inputs = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)
    return model, inputs, labels


def embed(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(model(inputs), dim=1)


def explicit_tuples(kind: str, rows: int) -> tuple[torch.Tensor, ...]:
    """A local batch's own tuples: pairs over [a..., b...] or triplets over [anchor..., positive..., negative...]."""
    if kind == "pairs":
        return explicit_pairs(rows)
    third = torch.arange(rows // 3)
    return third, third + rows // 3, third + 2 * (rows // 3)


def explicit_pairs(rows: int) -> tuple[torch.Tensor, ...]:
    """Pairs over a local batch laid out as [a_0..a_k, b_0..b_k]: (a_i, b_i), even i similar, odd i not."""
    half = rows // 2
    first = torch.arange(half)
    similar = first % 2 == 0
    return first[similar], first[similar] + half, first[~similar], first[~similar] + half


def reference(loss_cfg: LossConfig, miner_name: str, model, inputs, labels, explicit=None):
    """Plain PML on one process: default reducer, explicit tuples plus mined tuples."""
    model.zero_grad()
    loss = pml_value(loss_cfg, MiningConfig(name=miner_name), embed(model, inputs), labels, explicit)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def chunked(cfg: LossConfig, rows: int = 5) -> LossConfig:
    """The loss config walked in chunks smaller than any test batch, so chunk boundaries are exercised."""
    return cfg.model_copy(update={"chunk_entries": rows * GLOBAL_BATCH})


@pytest.mark.parametrize("chunk_rows", [5, 512])
@pytest.mark.parametrize("loss_name,miner_name", list(itertools.product(LOSSES, MINERS)))
def test_single_process_matches_pml(loss_name: str, miner_name: str, chunk_rows: int) -> None:
    model, inputs, labels = make_problem()
    expected_loss, expected_grads = reference(LOSSES[loss_name], miner_name, model, inputs, labels)
    objective = MetricObjective(chunked(LOSSES[loss_name], chunk_rows), MiningConfig(name=miner_name), Collective())
    model.zero_grad()
    out = objective(embed(model, inputs), labels)
    out.local_share.backward()
    assert expected_loss.item() > 0
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list[tuple[str, str, str | None]], failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    collective = ProcessGroupCollective()
    try:
        for loss_name, miner_name, kind in cases:
            model, inputs, labels = make_problem(seed=len(loss_name) + len(miner_name))
            local = GLOBAL_BATCH // world
            # With explicit tuples each rank's local batch is laid out as its own pairs or triplets.
            explicit_global = _global_tuples(kind, world, local) if kind else None
            if explicit_global is not None:
                labels = consistent_labels(labels, explicit_global)
            expected_loss, expected_grads = reference(
                LOSSES[loss_name], miner_name, model, inputs, labels, explicit_global)
            rows = slice(rank * local, (rank + 1) * local)
            objective = MetricObjective(chunked(LOSSES[loss_name]), MiningConfig(name=miner_name), collective)
            model.zero_grad()
            out = objective(embed(model, inputs[rows]), labels[rows],
                            explicit_tuples(kind, local) if kind else None)
            (out.local_share * world).backward()
            for param in model.parameters():  # what data-parallel training does: average gradients
                dist.all_reduce(param.grad)
                param.grad /= world
            torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
            for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=False):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        dist.barrier()  # no rank tears its gloo pairs down while another still uses them (SIGABRT)
    except AssertionError as error:
        failures.put(f"rank {rank} {loss_name}/{miner_name}/explicit={kind}: {error}")
    finally:
        dist.destroy_process_group()


def _global_tuples(kind: str, world: int, local: int) -> tuple[torch.Tensor, ...]:
    """The explicit tuples of every rank, in global row numbers (what one process sees)."""
    parts = [tuple(t + r * local for t in explicit_tuples(kind, local)) for r in range(world)]
    return tuple(torch.cat(c) for c in zip(*parts, strict=False))


def consistent_labels(labels: torch.Tensor, tuples: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Class ids that agree with the tuples (as the trainer's key-derived ids do): partners of a positive pair
    share the anchor's class, negatives get the next class of 4."""
    labels = labels.clone()
    if len(tuples) == 3:
        anchor, positive, negative = tuples
        labels[positive], labels[negative] = labels[anchor], (labels[anchor] + 1) % 4
        return labels
    a1, p, a2, n = tuples
    labels[p], labels[n] = labels[a1], (labels[a2] + 1) % 4
    return labels


def _run(world: int, cases: list, worker=_worker) -> None:
    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(world, _free_port(), cases, failures), nprocs=world,
                       start_method="spawn", join=True)
    reported = []
    while not failures.empty():
        reported.append(failures.get())
    assert not reported, "\n".join(reported)


def test_two_processes_match_one_for_every_loss_and_miner() -> None:
    """Every loss × miner, on labels alone and with explicit pairs or triplets from the shards."""
    _run(2, list(itertools.product(LOSSES, MINERS, [None, "pairs", "triplets"])))


def test_three_processes_match_one() -> None:
    _run(3, [("triplet", "semi_hard", None), ("multi_similarity", "multi_similarity", None),
             ("supcon", "none", None), ("contrastive", "none", "pairs"), ("infonce", "batch_hard", "triplets")])


def _memory_worker(rank: int, world: int, port: int, cases: list[tuple[str, str]], failures) -> None:
    """Three steps with a cross-batch memory: every rank's loss and averaged gradients equal one process's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for loss_name, miner_name in cases:
            memory_cfg = {"memory_size": 40, "memory_start_step": 1}
            single = MetricObjective(LOSSES[loss_name], MiningConfig(name=miner_name), Collective(),
                                     MemoryBank(40, start_step=1))
            spread = MetricObjective(chunked(LOSSES[loss_name]), MiningConfig(name=miner_name, **memory_cfg),
                                     ProcessGroupCollective(), MemoryBank(40, start_step=1))
            for step in range(3):
                model, inputs, labels = make_problem(seed=10 + step)
                model.zero_grad()
                expected = single(embed(model, inputs), labels)
                expected.local_share.backward()
                expected_grads = [p.grad.clone() for p in model.parameters()]
                local = GLOBAL_BATCH // world
                rows = slice(rank * local, (rank + 1) * local)
                model.zero_grad()
                out = spread(embed(model, inputs[rows]), labels[rows])
                (out.local_share * world).backward()
                for param in model.parameters():
                    dist.all_reduce(param.grad)
                    param.grad /= world
                torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
                for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(spread.memory.embeddings, single.memory.embeddings)
            assert single.memory.steps == 3 and len(single.memory.embeddings) == 40
        dist.barrier()  # no rank tears its gloo pairs down while another still uses them (SIGABRT)
    except AssertionError as error:
        failures.put(f"rank {rank} {loss_name}/{miner_name}/memory: {error}")
    finally:
        dist.destroy_process_group()


def test_two_processes_with_cross_batch_memory_match_one() -> None:
    _run(2, [("multi_similarity", "multi_similarity"), ("triplet", "batch_hard"), ("supcon", "none")],
         worker=_memory_worker)


def test_mining_sees_other_workers_positives() -> None:
    """Each anchor's only positive lives on the other rank: mining on local rows alone would find none."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # rank 0 holds rows 0-2, rank 1 rows 3-5
    model, inputs, _ = make_problem()

    class FakeRankOne(Collective):
        """Rank 0 of 2 whose partner holds rows 3-5 (gather returns the global batch)."""

        world_size = 2

        def gather_with_grad(self, tensor):
            return torch.cat([tensor, embed(model, inputs[3:6])])

        def gather(self, tensor):
            return torch.cat([tensor, labels[3:6]])

    objective = MetricObjective(LOSSES["triplet"], MiningConfig(name="batch_hard"), FakeRankOne())
    out = objective(embed(model, inputs[:3]), labels[:3])
    assert out.stats["anchors_with_positive"] == 1.0
    assert out.stats["tuples"] == 3


def _brute_force_inputs() -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    gen = torch.Generator().manual_seed(3)
    embeddings = torch.nn.functional.normalize(torch.randn(7, 3, generator=gen), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    distance = [[float(torch.dist(a, b)) for b in embeddings] for a in embeddings]
    return embeddings, labels, distance


def _mean_nonzero(values: list[float]) -> float:
    kept = [v for v in values if v > 0]
    return sum(kept) / len(kept) if kept else 0.0


def test_contrastive_against_hand_enumerated_pairs() -> None:
    """PML's contrastive loss (hinge on distances, unsquared): mean of non-zero positive terms
    max(0, d - pos_margin) plus mean of non-zero negative terms max(0, neg_margin - d), over ordered pairs."""
    embeddings, labels, d = _brute_force_inputs()
    pos_margin, neg_margin = 0.2, 1.1
    n = len(labels)
    positives = [max(0.0, d[i][j] - pos_margin)
                 for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    negatives = [max(0.0, neg_margin - d[i][j]) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    expected = _mean_nonzero(positives) + _mean_nonzero(negatives)
    cfg = LossConfig(name="contrastive", distance="euclidean", pos_margin=pos_margin, neg_margin=neg_margin)
    out = MetricObjective(cfg, MiningConfig(name="none"), Collective())(embeddings, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_and_batch_hard_against_hand_enumerated_triplets() -> None:
    embeddings, labels, d = _brute_force_inputs()
    margin, n = 0.3, len(labels)
    triplets = [(a, p, q) for a in range(n) for p in range(n) for q in range(n)
                if a != p and labels[a] == labels[p] and labels[a] != labels[q]]
    expected = _mean_nonzero([max(0.0, d[a][p] - d[a][q] + margin) for a, p, q in triplets])
    cfg = LossConfig(name="triplet", distance="euclidean", margin=margin)
    out = MetricObjective(cfg, MiningConfig(name="none"), Collective())(embeddings, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.stats["tuples"] == len(triplets)
    # Batch-hard: for each anchor, its farthest positive and nearest negative.
    hardest = []
    for a in range(n):
        p = max((j for j in range(n) if j != a and labels[j] == labels[a]), key=lambda j: d[a][j])
        q = min((j for j in range(n) if labels[j] != labels[a]), key=lambda j: d[a][j])
        hardest.append(max(0.0, d[a][p] - d[a][q] + margin))
    out = MetricObjective(cfg, MiningConfig(name="batch_hard"), Collective())(embeddings, labels)
    assert out.loss.item() == pytest.approx(_mean_nonzero(hardest), rel=1e-5)
