"""The global-batch objective equals pytorch-metric-learning on one process, on 1, 2 and 3 real processes.

Multi-process cases use torch.distributed with gloo: each rank embeds its slice of one global batch, computes
its share, and the averaged parameter gradients (what DeepSpeed's data parallelism does) must equal the
gradients of one process running plain PML (default reducer) on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from pml_reference import in_batch_value, pml_value
from spawned import run_ranks

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.gather import Collective, ProcessGroupCollective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.objective import MetricObjective
from trainer.objectives.selection import with_in_batch_negatives

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
SOFTMAX = ("supcon", "infonce")
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
    """Plain PML on one process: default reducer, explicit tuples plus mined tuples. SupCon and InfoNCE on
    explicit tuples without a miner take in-batch negatives, which PML has no form for: brute force then."""
    model.zero_grad()
    if explicit is not None and miner_name == "none" and loss_cfg.name in SOFTMAX:
        loss = in_batch_value(loss_cfg, embed(model, inputs), labels, explicit)
    else:
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


@contextlib.contextmanager
def _case(name: str) -> Iterator[None]:
    """Name the case in a failure's message (the loops run many cases in one set of processes)."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{name}: {error}") from error


def _worker(rank: int, world: int, cases: list[tuple[str, str, str | None]]) -> None:
    torch.set_num_threads(1)
    collective = ProcessGroupCollective()
    for loss_name, miner_name, kind in cases:
        with _case(f"{loss_name}/{miner_name}/explicit={kind}"):
            model, inputs, labels = make_problem(seed=len(loss_name) + len(miner_name))
            local = GLOBAL_BATCH // world
            # With explicit tuples each rank's local batch is laid out as its own pairs or triplets.
            explicit_global = None
            if kind:
                inputs, labels, explicit_global = tuple_problem(kind, world, local, inputs, labels)
            expected_loss, expected_grads = reference(
                LOSSES[loss_name], miner_name, model, inputs, labels, explicit_global)
            rows = slice(rank * local, (rank + 1) * local)
            objective = MetricObjective(chunked(LOSSES[loss_name]), MiningConfig(name=miner_name), collective)
            model.zero_grad()
            out = objective(embed(model, inputs[rows]), labels[rows],
                            explicit_tuples(kind.split("+")[0], local) if kind else None)
            (out.local_share * world).backward()
            for param in model.parameters():  # what data-parallel training does: average gradients
                dist.all_reduce(param.grad)
                param.grad /= world
            torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
            for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=False):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _global_tuples(kind: str, world: int, local: int) -> tuple[torch.Tensor, ...]:
    """The explicit tuples of every rank, in global row numbers (what one process sees)."""
    parts = [tuple(t + r * local for t in explicit_tuples(kind, local)) for r in range(world)]
    return tuple(torch.cat(c) for c in zip(*parts, strict=False))


def tuple_problem(kind: str, world: int, local: int, inputs: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Inputs, labels and global tuples for `kind`: pairs or triplets with class ids consistent with the tuples,
    or `<kind>+duplicates`: labels as the trainer makes them without class ids ([N, 2]: one class per tuple, and
    content ids), with items repeated across ranks (see `with_duplicates`)."""
    base, _, duplicates = kind.partition("+")
    tuples = _global_tuples(base, world, local)
    if not duplicates:
        return inputs, consistent_labels(labels, tuples), tuples
    inputs, labels = with_duplicates(base, world, local, inputs, tuples)
    return inputs, labels, tuples


def with_duplicates(kind: str, world: int, local: int, inputs: torch.Tensor, tuples: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of items in other tuples, on the first and the last rank: a positive shared by two anchors (q1, d1),
    (q2, d1); one anchor in two tuples; an anchor that is another tuple's positive; and, for triplets, a positive
    that is another triplet's explicit negative. Class ids: 2t for tuple t's anchor and positive, 2t + 1 for its
    negative; content ids are shared by copies only."""
    rows = len(inputs)
    classes, content = 2 * torch.arange(rows), 1000 + torch.arange(rows)
    anchors, positives, negatives = (tuples[0], tuples[1], tuples[3]) if kind == "pairs" else tuples
    negative_anchors = tuples[2] if kind == "pairs" else tuples[0]
    classes[positives] = 2 * anchors
    classes[negatives] = 2 * negative_anchors + 1
    last = (world - 1) * local
    shift = local // 2 if kind == "pairs" else local // 3  # from an anchor to its positive
    other = 2 if kind == "pairs" else 1  # another tuple with a positive
    copies = [(shift, last + shift), (0, last + other), (last, shift + other)]  # (source row, copy row)
    if kind == "triplets":
        copies.append((last + shift, 2 * shift + 1))
    inputs = inputs.clone()
    for source, copy in copies:
        inputs[copy], content[copy] = inputs[source], content[source]
    return inputs, torch.stack([classes, content], dim=1)


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
    run_ranks(worker, world, cases)


IN_BATCH = list(itertools.product(SOFTMAX, ["none"], ["pairs", "triplets", "pairs+duplicates",
                                                      "triplets+duplicates"]))
"""SupCon / InfoNCE on explicit tuples with in-batch negatives (brute-force reference), with class ids and with
the trainer's [N, 2] labels over items repeated across ranks."""


def test_two_processes_match_one_for_every_loss_and_miner() -> None:
    """Every loss × miner, on labels alone and with explicit pairs or triplets from the shards."""
    _run(2, list(itertools.product(LOSSES, MINERS, [None, "pairs", "triplets"])) + IN_BATCH[2:4] + IN_BATCH[6:])


def test_three_processes_match_one() -> None:
    _run(3, [("triplet", "semi_hard", None), ("multi_similarity", "multi_similarity", None),
             ("supcon", "none", None), ("contrastive", "none", "pairs"), ("infonce", "batch_hard", "triplets"),
             *IN_BATCH])


@pytest.mark.parametrize("chunk_rows", [5, 512])
@pytest.mark.parametrize("loss_name,miner_name,kind", IN_BATCH)
def test_single_process_in_batch_negatives_match_brute_force(loss_name: str, miner_name: str, kind: str,
                                                             chunk_rows: int) -> None:
    model, inputs, labels = make_problem()
    inputs, labels, tuples = tuple_problem(kind, 2, GLOBAL_BATCH // 2, inputs, labels)
    expected_loss, expected_grads = reference(LOSSES[loss_name], miner_name, model, inputs, labels, tuples)
    objective = MetricObjective(chunked(LOSSES[loss_name], chunk_rows), MiningConfig(name=miner_name), Collective())
    model.zero_grad()
    out = objective(embed(model, inputs), labels, tuples)
    out.local_share.backward()
    assert expected_loss.item() > 0
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_name", SOFTMAX)
def test_similar_pairs_alone_learn_from_in_batch_negatives(loss_name: str) -> None:
    """Only similar pairs (anchor, positive), no class ids, no miner: every other item is a negative, so the
    loss and its gradient are not zero (they were, when only the shard's tuples counted)."""
    model, inputs, _ = make_problem()
    half = GLOBAL_BATCH // 2
    first = torch.arange(half)
    labels = torch.stack([torch.cat([2 * first, 2 * first]), 1000 + torch.arange(GLOBAL_BATCH)], dim=1)
    objective = MetricObjective(LOSSES[loss_name], MiningConfig(name="none"), Collective())
    out = objective(embed(model, inputs), labels, (first, first + half, first[:0], first[:0]))
    out.local_share.backward()
    assert out.loss.item() > 0.5
    assert out.stats["tuples"] == half + half * (GLOBAL_BATCH - 2)  # each anchor: 1 positive, 22 negatives
    assert all(float(p.grad.norm()) > 1e-3 for p in model.parameters())


def test_duplicates_of_an_anchor_or_its_positive_are_not_its_negatives() -> None:
    """Pairs (q1, d1), (q2, d1), (q1, d3) over rows [q1, q2, q1', d1, d1', d3]: q1's negatives are q2 and d3
    (its copy q1' and both copies of d1 are not); q2's are q1, q1' and d3 (not d1 nor d1')."""
    none = torch.tensor([], dtype=torch.long)
    q1, q2, d1, d3 = 11, 12, 21, 23
    content = torch.tensor([q1, q2, q1, d1, d1, d3])
    labels = torch.stack([torch.tensor([0, 2, 4, 0, 2, 4]), content], dim=1)  # one class per pair
    embeddings = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    seen = {}

    def spy(part, block):
        pairs = with_in_batch_negatives(part, block)
        seen["neg"] = pairs.neg.clone()
        return pairs

    objective = MetricObjective(LOSSES["infonce"], MiningConfig(name="none"), Collective())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("trainer.objectives.objective.with_in_batch_negatives", spy)
        objective(embeddings, labels, (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), none, none))
    negatives = {row: seen["neg"][row].nonzero().flatten().tolist() for row in range(3)}
    assert negatives == {0: [1, 5], 1: [0, 2, 5], 2: [1, 3, 4]}  # q1' (positive d3): q2 and both d1


def _memory_worker(rank: int, world: int, cases: list[tuple[str, str, str | None]]) -> None:
    """Three steps with a cross-batch memory: every rank's loss and averaged gradients equal one process's."""
    torch.set_num_threads(1)
    for loss_name, miner_name, kind in cases:
        with _case(f"{loss_name}/{miner_name}/explicit={kind}/memory"):
            memory_cfg = {"memory_size": 40, "memory_start_step": 1}
            single = MetricObjective(LOSSES[loss_name], MiningConfig(name=miner_name), Collective(),
                                     MemoryBank(40, start_step=1))
            spread = MetricObjective(chunked(LOSSES[loss_name]), MiningConfig(name=miner_name, **memory_cfg),
                                     ProcessGroupCollective(), MemoryBank(40, start_step=1))
            for step in range(3):
                model, inputs, labels = make_problem(seed=10 + step)
                local = GLOBAL_BATCH // world
                tuples, own = None, None
                if kind:  # explicit tuples over items repeated across steps and ranks, with in-batch negatives
                    inputs, labels, tuples = tuple_problem(kind, world, local, inputs, labels)
                    own = explicit_tuples(kind.split("+")[0], local)
                model.zero_grad()
                expected = single(embed(model, inputs), labels, tuples)
                expected.local_share.backward()
                expected_grads = [p.grad.clone() for p in model.parameters()]
                rows = slice(rank * local, (rank + 1) * local)
                model.zero_grad()
                out = spread(embed(model, inputs[rows]), labels[rows], own)
                (out.local_share * world).backward()
                for param in model.parameters():
                    dist.all_reduce(param.grad)
                    param.grad /= world
                torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
                for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
                single.commit_memory()
                spread.commit_memory()
                torch.testing.assert_close(spread.memory.embeddings, single.memory.embeddings)
            assert single.memory.steps == 3 and len(single.memory.embeddings) == 40


def test_two_processes_with_cross_batch_memory_match_one() -> None:
    _run(2, [("multi_similarity", "multi_similarity", None), ("triplet", "batch_hard", None), ("supcon", "none", None),
             ("infonce", "none", "pairs+duplicates")], worker=_memory_worker)


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
