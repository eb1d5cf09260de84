"""Cross-batch memory: the bank's FIFO contents, its safetensors round trip, and the loss against PML with
the bank as PML's `ref_emb` (the memory's rows are extra references, never anchors)."""

from __future__ import annotations

import pytest
import torch
from pml_reference import pml_loss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from safetensors.torch import load_file, save_file

from trainer.config import LossConfig, MiningConfig
from trainer.objectives.gather import Collective
from trainer.objectives.memory import MemoryBank
from trainer.objectives.objective import MetricObjective


def test_bank_keeps_the_newest_rows_in_order() -> None:
    bank = MemoryBank(5)
    for step in range(3):
        bank.enqueue(torch.full((2, 3), float(step)), torch.tensor([step, step]))
    assert bank.embeddings[:, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert bank.labels.tolist() == [0, 1, 1, 2, 2]
    assert bank.steps == 3


def test_bank_waits_for_its_start_step() -> None:
    bank = MemoryBank(8, start_step=2)
    bank.enqueue(torch.ones(2, 3), torch.tensor([0, 1]))
    assert not bank.ready
    bank.enqueue(torch.ones(2, 3), torch.tensor([0, 1]))
    assert bank.ready


def test_bank_round_trips_through_safetensors(tmp_path) -> None:
    bank = MemoryBank(6)
    bank.enqueue(torch.randn(4, 3), torch.tensor([3, 1, 4, 1]))
    save_file(bank.state_dict(), tmp_path / "memory.safetensors")
    restored = MemoryBank(6)
    restored.load_state_dict(load_file(tmp_path / "memory.safetensors"))
    assert torch.equal(restored.embeddings, bank.embeddings) and torch.equal(restored.labels, bank.labels)
    assert restored.steps == bank.steps


@pytest.mark.parametrize("name", ["contrastive", "supcon", "multi_similarity"])
def test_loss_with_memory_equals_pml_with_the_bank_as_references(name: str) -> None:
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 4, generator=gen, requires_grad=True)
    inputs, labels = torch.randn(10, 5, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    banked, banked_labels = torch.randn(7, 4, generator=gen), torch.randint(0, 3, (7,), generator=gen)
    # 17 references (10 batch rows, 7 banked): 51 entries are chunks of 3 anchors.
    cfg = LossConfig(name=name, distance="cosine", pos_margin=0.9, neg_margin=0.2, chunk_entries=51)

    embeddings = inputs @ weight
    references, reference_labels = torch.cat([embeddings, banked]), torch.cat([labels, banked_labels])
    a1, p, a2, n = lmu.get_all_pairs_indices(labels, reference_labels)
    not_self = a1 != p  # the batch is the first block of the references: drop each anchor's own column
    expected = pml_loss(cfg)(embeddings, labels, (a1[not_self], p[not_self], a2, n), references, reference_labels)
    expected_grad, = torch.autograd.grad(expected, weight)

    bank = MemoryBank(7)
    bank.enqueue(banked, banked_labels)
    objective = MetricObjective(cfg, MiningConfig(name="none"), Collective(), bank)
    out = objective(inputs @ weight, labels)
    got_grad, = torch.autograd.grad(out.local_share, weight)
    assert len(bank.embeddings) == 7 and bank.labels[-1] == banked_labels[-1]  # banked only once the step is kept
    objective.commit_memory()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert len(bank.embeddings) == 7 and bank.labels[-1] == labels[-1]  # the step's batch was enqueued
