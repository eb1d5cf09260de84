"""Every collective of a run goes through trainer/objectives/gather.py, which moves tensors to the process
group's device (NCCL reduces CUDA tensors only) and hands results back on the caller's device.

The GPU test runs only where CUDA is present; on CPU it is reported as skipped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from spawned import run_ranks

from trainer.objectives.gather import Collective, ProcessGroupCollective, group_device

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "trainer" / "objectives" / "gather.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_gather_single_autograd",
               "all_reduce_coalesced", "all_gather_coalesced"}
DISTRIBUTED = ("torch.distributed", "deepspeed.comm")


def collective_calls(path: Path) -> list[str]:
    """`dist.all_reduce(...)`-like calls in a file: names bound to torch.distributed (or one of its modules, or
    deepspeed.comm) called with a collective's name, and collectives imported from them by name."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names if alias.name.startswith(DISTRIBUTED))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module.startswith(DISTRIBUTED) and alias.name in COLLECTIVES:
                    imported.add(alias.asname or alias.name)
                elif f"{node.module}.{alias.name}".startswith(DISTRIBUTED):
                    modules.add(alias.asname or alias.name)  # a module: torch.distributed, deepspeed.comm, ...
    found = []
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in modules:
            found.append(f"{where}:{node.lineno}: {ast.unparse(func)}")
        elif isinstance(func, ast.Name) and func.id in imported:
            found.append(f"{where}:{node.lineno}: {func.id}")
    return found


def test_no_collective_outside_the_one_helper() -> None:
    stray = [call for path in sorted((ROOT / "trainer").rglob("*.py")) if path != HOME
             for call in collective_calls(path)]
    assert not stray, "collectives outside trainer/objectives/gather.py:\n" + "\n".join(stray)


def test_the_scan_finds_collectives(tmp_path: Path) -> None:
    """The check above can fail: every spelling of a collective call is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("import torch.distributed as dist\nimport torch.distributed\n"
                      "from torch.distributed import all_reduce as reduce_all, get_rank\n"
                      "from deepspeed import comm\n"
                      "dist.all_reduce(x)\ntorch.distributed.barrier()\nreduce_all(y)\ncomm.all_gather(z)\n"
                      "get_rank()\ndist.get_world_size()\n")
    found = collective_calls(sample)
    assert [line.rsplit(": ", 1)[1] for line in found] == ["dist.all_reduce", "torch.distributed.barrier",
                                                           "reduce_all", "comm.all_gather"]


def test_group_device_routes_by_backend() -> None:
    assert group_device("nccl", 3) == torch.device("cuda", 3)
    assert group_device("gloo", None) == torch.device("cpu")
    assert group_device("cpu:gloo,cuda:nccl", 0) is None  # a mixed group takes each tensor where it is
    with pytest.raises(RuntimeError, match="CUDA device"):
        group_device("nccl", None)


def test_one_process_collective_is_the_identity() -> None:
    one = Collective()
    tensor = torch.arange(6.0).view(3, 2)
    for result in (one.gather(tensor), one.gather_rows(tensor), one.sum(tensor), one.max(tensor),
                   one.gather_with_grad(tensor)):
        assert torch.equal(result, tensor)
    one.barrier()


def _every_collective(rank: int, world: int) -> None:
    collective = ProcessGroupCollective()
    cpu = torch.device("cpu")
    rows = torch.full((rank + 1, 2), float(rank))  # rank r holds r + 1 rows: an uneven evaluation share
    gathered = collective.gather_rows(rows)
    assert gathered.device == cpu and gathered[:, 0].tolist() == [r for r in range(world) for _ in range(r + 1)]
    flags = collective.max(torch.tensor([rank, -rank], dtype=torch.int64))
    assert flags.device == cpu and flags.tolist() == [world - 1, 0]
    counts = collective.sum(torch.tensor([1], dtype=torch.int32))
    assert counts.dtype == torch.int32 and counts.item() == world
    labels = collective.gather(torch.tensor([rank]))
    assert labels.tolist() == list(range(world))
    embeddings = torch.full((2, 3), float(rank + 1), requires_grad=True)
    everyone = collective.gather_with_grad(embeddings)
    (everyone * torch.arange(1.0, 2 * world + 1).view(-1, 1)).sum().backward()
    assert everyone.device == cpu and embeddings.grad is not None
    # Each rank's rows got the gradient every rank's loss put on them (the sum over ranks, here world ×).
    want = world * torch.arange(2 * rank + 1.0, 2 * rank + 3).view(-1, 1).expand(2, 3)
    torch.testing.assert_close(embeddings.grad, want)
    collective.barrier()


def test_collectives_over_gloo_with_uneven_shares() -> None:
    run_ranks(_every_collective, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_cpu_tensors_through_an_nccl_group() -> None:
    """On an NCCL group the callers' CPU flags, counters and rows go through and come back on the CPU."""
    run_ranks(_every_collective, max(1, min(2, torch.cuda.device_count())), backend="nccl")
