"""The exact global-batch objective through real DeepSpeed engines: 2 and 3 gloo processes, ZeRO 0 and 2.

test_objectives.py averages gradients by hand; here DeepSpeed does it, as in training: each process builds the
run's engine (trainer.engine.engine.build_engine), takes the objective on its slice of the global batch, calls
`engine.backward(local_share × world)`, and the full gradient DeepSpeed holds afterwards (assembled from the
ZeRO partitions where there are any) must equal plain pytorch-metric-learning's gradient on one process over the
concatenated batch. The logged loss must equal PML's loss.
"""

from __future__ import annotations

import pytest
import torch
from spawned import run_ranks
from test_objectives import (
    GLOBAL_BATCH,
    LOSSES,
    _case,
    _global_tuples,
    chunked,
    consistent_labels,
    embed,
    explicit_tuples,
    make_problem,
    reference,
)

from trainer import config
from trainer.config import MiningConfig
from trainer.objectives.gather import ProcessGroupCollective
from trainer.objectives.objective import MetricObjective

pytestmark = pytest.mark.slow

CASES = [("supcon", "none", None), ("multi_similarity", "multi_similarity", None), ("triplet", "batch_hard", None),
         ("contrastive", "none", "pairs"), ("infonce", "semi_hard", "triplets")]


def _worker(rank: int, world: int, zero_stage: int, cases: list) -> None:
    from deepspeed.utils import safe_get_full_grad

    from trainer.engine.engine import build_engine

    torch.set_num_threads(1)
    local = GLOBAL_BATCH // world
    cfg = config.from_dict({"data": {"batch_size": local}, "dist": {"zero_stage": zero_stage},
                            "log": {"wandb": False}})
    for loss_name, miner_name, kind in cases:
        with _case(f"{loss_name}/{miner_name}/explicit={kind}/zero={zero_stage}"):
            model, inputs, labels = make_problem(seed=len(loss_name) + len(miner_name))
            explicit_global = _global_tuples(kind, world, local) if kind else None
            if explicit_global is not None:
                labels = consistent_labels(labels, explicit_global)
            expected_loss, expected_grads = reference(LOSSES[loss_name], miner_name, model, inputs, labels,
                                                      explicit_global)
            model.zero_grad()
            engine = build_engine(model, cfg, world, 10, torch.device("cpu"))
            objective = MetricObjective(chunked(LOSSES[loss_name]), MiningConfig(name=miner_name),
                                        ProcessGroupCollective())
            rows = slice(rank * local, (rank + 1) * local)
            out = objective(embed(engine, inputs[rows]), labels[rows], explicit_tuples(kind, local) if kind else None)
            engine.backward(out.local_share * world)  # what TrainLoop._step does
            torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
            for param, want in zip(engine.module.parameters(), expected_grads, strict=True):
                got = safe_get_full_grad(param)
                assert got is not None, "DeepSpeed holds no gradient for a parameter"
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            engine.destroy()


@pytest.mark.parametrize("world,zero_stage,cases", [(2, 0, CASES), (2, 2, CASES[:3]), (3, 1, CASES[2:])])
def test_deepspeed_averaged_gradients_equal_one_process(world: int, zero_stage: int, cases: list) -> None:
    run_ranks(_worker, world, zero_stage, cases, env=True)
