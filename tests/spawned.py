"""Run a test body on several real processes joined by a torch.distributed group (gloo here, NCCL on GPUs).

Each rank runs `target(rank, world, *args)`; whatever it raises is reported with its traceback, and the test fails
with every rank's report. After the body every rank meets at a barrier and then leaves with `os._exit`, without
tearing the process group down: gloo's teardown races with the other ranks closing their sockets and now and then
aborts a rank ("terminate called without an active exception", SIGABRT), even after a barrier (seen once in 16
full-suite runs). The operating system closes the sockets instead.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from faults.faultrun import free_port

TIMEOUT = datetime.timedelta(seconds=180)  # a rank that failed early must not leave the others waiting for 30 min


def _rank_main(rank: int, world: int, port: int, backend: str, target: Callable[..., None], args: tuple,
               env: bool, failures: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if env:  # what torchrun sets, for code that reads it (DeepSpeed)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    code = 0
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
        target(rank, world, *args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - every failure of a rank is reported, then the rank leaves
        failures.put(f"rank {rank} of {world}:\n{traceback.format_exc()}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(target: Callable[..., None], world: int, *args: Any, backend: str = "gloo", env: bool = False) -> None:
    """Run `target(rank, world, *args)` on `world` spawned processes; fail with every rank's error."""
    failures = mp.get_context("spawn").SimpleQueue()
    exited = ""
    try:
        mp.start_processes(_rank_main, args=(world, free_port(), backend, target, args, env, failures),
                           nprocs=world, start_method="spawn", join=True)
    except mp.ProcessExitedException as error:
        exited = str(error)
    reported = []
    while not failures.empty():
        reported.append(failures.get())
    assert not reported and not exited, "\n".join(reported) or exited
