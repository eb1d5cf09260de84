"""Epoch plans: which shards every (rank, DataLoader worker) slot streams, and how many batches each rank yields.

Computed from index.json alone (the shard list and per-shard counts), so every rank agrees without reading data:
unequal batch counts would hang DeepSpeed's collectives. `plan_epoch` shuffles the shards with (seed, epoch) and
assigns whole shards to slots; in resampled mode (data.epoch_samples) every slot draws shards with replacement.
`eval_share` splits an evaluation split into contiguous per-rank shares.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import numpy as np

from trainer.data.formats import ShardIndex, ShardInfo
from trainer.errors import DataError


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, DataLoader worker) slot reads this epoch, and how many batches every rank yields."""

    seed: int
    epoch: int
    world_size: int
    workers: int
    """Slots per rank: max(1, loader_workers)."""
    batch_size: int
    order: tuple[str, ...]
    """The shard files in this epoch's shuffled order."""
    slots: tuple[tuple[tuple[str, ...], ...], ...]
    """slots[rank][worker]: the shard files that slot streams, in shuffled order."""
    slot_samples: tuple[tuple[int, ...], ...]
    """slot_samples[rank][worker]: samples in those shards."""
    batches_per_rank: int
    """Batches every rank yields: the smallest number of full batches any rank can make."""
    num_samples: int

    def rank_batches(self, rank: int) -> int:
        """Full batches rank `rank` could make (each slot batches only its own samples)."""
        return sum(samples // self.batch_size for samples in self.slot_samples[rank])

    @property
    def samples_per_epoch(self) -> int:
        """Samples yielded over all ranks this epoch."""
        return self.batches_per_rank * self.batch_size * self.world_size

    @property
    def dropped_samples(self) -> int:
        """Samples not yielded this epoch: partial batches and batches beyond the smallest rank's count."""
        return self.num_samples - self.samples_per_epoch


def plan_epoch(index: ShardIndex, *, seed: int, epoch: int, world_size: int, loader_workers: int,
               batch_size: int, epoch_samples: int | None = None) -> EpochPlan:
    """Shuffle the shards with (seed, epoch) and assign them to every rank's DataLoader workers.

    With `epoch_samples` (resampled mode) every slot draws from all shards with replacement (`_SlotShards`) and
    each rank yields epoch_samples // (world_size × batch_size) batches; no sample counts are needed."""
    if world_size < 1 or loader_workers < 0 or batch_size < 1:
        raise DataError(f"plan_epoch: need world_size ≥ 1, loader_workers ≥ 0 and batch_size ≥ 1, got "
                        f"{world_size}, {loader_workers}, {batch_size}")
    workers = max(1, loader_workers)
    if epoch_samples is not None:
        return _resampled_plan(index, seed=seed, epoch=epoch, world_size=world_size, workers=workers,
                               batch_size=batch_size, epoch_samples=epoch_samples)
    permutation = np.random.default_rng([seed % 2**63, epoch % 2**63]).permutation(len(index.shards))
    shuffled = [index.shards[i] for i in permutation]
    slots = _assign(shuffled, world_size, workers)
    plan = EpochPlan(seed=seed, epoch=epoch, world_size=world_size, workers=workers, batch_size=batch_size,
                     order=tuple(shard.file for shard in shuffled),
                     slots=tuple(tuple(tuple(s.file for s in slot) for slot in rank) for rank in slots),
                     slot_samples=tuple(tuple(sum(s.samples for s in slot) for slot in rank) for rank in slots),
                     batches_per_rank=0, num_samples=index.num_samples)
    batches = [plan.rank_batches(rank) for rank in range(world_size)]
    if min(batches) == 0:
        raise DataError(_too_few_shards(index, plan, batches.index(0)))
    return dataclasses.replace(plan, batches_per_rank=min(batches))


def _resampled_plan(index: ShardIndex, *, seed: int, epoch: int, world_size: int, workers: int, batch_size: int,
                    epoch_samples: int) -> EpochPlan:
    batches = epoch_samples // (world_size * batch_size)
    if batches == 0:
        raise DataError(f"data.epoch_samples: {epoch_samples} samples make no batch of {batch_size} on each of "
                        f"{world_size} rank(s); raise it to at least {world_size * batch_size}")
    every = tuple(shard.file for shard in index.shards)
    return EpochPlan(seed=seed, epoch=epoch, world_size=world_size, workers=workers, batch_size=batch_size,
                     order=every, slots=tuple(tuple(every for _ in range(workers)) for _ in range(world_size)),
                     slot_samples=tuple(tuple(0 for _ in range(workers)) for _ in range(world_size)),
                     batches_per_rank=batches, num_samples=epoch_samples)


def _assign(shards: list[ShardInfo], world_size: int, workers: int) -> list[list[list[ShardInfo]]]:
    # Largest shards first, each to the least-loaded slot; ties go worker-major (rank 0 worker 0, rank 1 worker
    # 0, ...) so equal shards are split by node first, then by worker. Slot loads then depend only on the shard
    # sizes, so batches_per_rank is the same every epoch; each slot reads its shards in shuffled order.
    heap = [(0, worker * world_size + rank) for worker in range(workers) for rank in range(world_size)]
    chosen: dict[int, list[int]] = {slot: [] for _, slot in heap}
    for position in sorted(range(len(shards)), key=lambda i: -shards[i].samples):
        load, slot = heapq.heappop(heap)
        chosen[slot].append(position)
        heapq.heappush(heap, (load + shards[position].samples, slot))
    return [[[shards[i] for i in sorted(chosen[worker * world_size + rank])] for worker in range(workers)]
            for rank in range(world_size)]


def _too_few_shards(index: ShardIndex, plan: EpochPlan, rank: int) -> str:
    sizes = ", ".join(str(n) for n in plan.slot_samples[rank])
    return (f"{len(index.shards)} shard(s) of {index.num_samples} samples cannot give every one of "
            f"{plan.world_size} rank(s) × {plan.workers} loader worker(s) a full batch of {plan.batch_size}: "
            f"whole shards go to one slot each, and rank {rank}'s slots hold {sizes} sample(s), 0 full batches. "
            f"Write more, smaller shards (a lower samples_per_shard), use fewer data.loader_workers, or a "
            f"smaller data.batch_size")


def eval_share(index: ShardIndex, rank: int, world_size: int) -> dict[str, tuple[int, int]]:
    """Rank `rank`'s evaluation share: {shard file: (first, end) sample positions within that shard}.

    Samples [N·rank/W, N·(rank+1)/W) of the index order: shares differ in size by at most one sample, and a rank
    may get none (more ranks than samples)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    first, end = index.num_samples * rank // world_size, index.num_samples * (rank + 1) // world_size
    share, offset = {}, 0
    for shard in index.shards:
        low, high = max(first, offset), min(end, offset + shard.samples)
        if low < high:
            share[shard.file] = (low - offset, high - offset)
        offset += shard.samples
    return share
