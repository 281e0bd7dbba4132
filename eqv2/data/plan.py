"""Epoch planning from the manifest alone: which shards each (rank, worker) slot reads, in what
order, and how its samples are cut into batches so that every slot yields the same number.

Policy (also in docs/data.md):
1. Slots.  A rank with W' = max(1, num_workers) DataLoader workers owns slots rank*W' ... rank*W'+W'-1;
   there are world_size*W' slots.  Each epoch the shards are permuted by (seed, epoch) and dealt, in
   that order, to the slot with the smallest load so far (samples for `batch_size`, atoms for
   `max_atoms`), so every shard is read by exactly one slot: each sample exactly once per epoch.
2. Equal steps.  Every slot yields exactly K batches, K being the same for all slots and computed
   here from the manifest: with `batch_size` B, K = max over slots of ceil(m_s / B) and sample i of
   a slot with m_s samples goes to batch floor(i*K / m_s) (batches of floor or ceil of m_s/K <= B);
   with `max_atoms` M, K = max over slots of ceil(A_s / (M - n_max + 1)) and a sample whose
   preceding atoms in the slot are c goes to batch floor(c*K / A_s), which keeps every batch within
   M atoms (n_max = largest structure).  Nothing is dropped or repeated; a slot holding too few
   samples to fill K batches is a configuration error raised here, before any step is taken.
3. Shuffle.  Within a slot, consecutive shards are grouped until a group holds at least
   `shuffle_buffer` samples; each group is loaded whole and permuted by (seed, epoch, slot, group).
   Memory stays at one group per worker, and resuming at any batch reloads one group.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from eqv2.data.manifest import ShardInfo


class PlanError(ValueError):
    """The data cannot be split as configured; the message says which setting to change."""


@dataclass(frozen=True)
class SlotPlan:
    slot: int  # global slot index
    shards: tuple[int, ...]  # indices into the shard list, in reading order
    groups: tuple[tuple[int, int], ...]  # [start, end) positions in `shards` of each shuffle group
    samples: int
    atoms: int


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    num_batches: int  # K: batches per slot (identical for every slot)
    by_atoms: bool
    slots: tuple[SlotPlan, ...]


def _groups(infos: list[ShardInfo], order: list[int], buffer: int) -> tuple[tuple[int, int], ...]:
    groups, start, acc = [], 0, 0
    for pos, idx in enumerate(order):
        acc += infos[idx].count
        if acc >= buffer:
            groups.append((start, pos + 1))
            start, acc = pos + 1, 0
    if start < len(order):
        groups.append((start, len(order)))
    return tuple(groups)


def plan_epoch(
    infos: list[ShardInfo],
    num_slots: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    batch_size: int,
    max_atoms: int,
    shuffle_buffer: int,
) -> EpochPlan:
    if len(infos) < num_slots:
        raise PlanError(
            f"{len(infos)} shards cannot feed {num_slots} reader slots (world_size x max(1, num_workers)); "
            f"write more, smaller shards (tools/shard_*.py --shard-samples) or lower data.num_workers"
        )
    by_atoms = max_atoms > 0
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(infos)) if shuffle else np.arange(len(infos))
    heap = [(0, s) for s in range(num_slots)]
    assigned: list[list[int]] = [[] for _ in range(num_slots)]
    for idx in order.tolist():
        load, s = heapq.heappop(heap)
        assigned[s].append(idx)
        heapq.heappush(heap, (load + (infos[idx].atoms if by_atoms else infos[idx].count), s))
    slots = []
    for s, shards in enumerate(assigned):
        samples = sum(infos[i].count for i in shards)
        atoms = sum(infos[i].atoms for i in shards)
        slots.append(SlotPlan(s, tuple(shards), _groups(infos, shards, shuffle_buffer), samples, atoms))
    if by_atoms:
        n_max = max(i.max_natoms for i in infos)
        if max_atoms < n_max:
            raise PlanError(f"data.max_atoms={max_atoms} is smaller than the largest structure ({n_max} atoms)")
        k = max(math.ceil(sl.atoms / (max_atoms - n_max + 1)) for sl in slots)
        thin = min(slots, key=lambda sl: sl.atoms)
        if thin.atoms < k * n_max:
            raise PlanError(
                f"epoch {epoch}: slot {thin.slot} holds {thin.atoms} atoms, too few for {k} batches of up to "
                f"data.max_atoms={max_atoms} (structures up to {n_max} atoms); raise data.max_atoms to at least "
                f"2x the largest structure, or use more, smaller shards so slots balance"
            )
    else:
        k = max(math.ceil(sl.samples / batch_size) for sl in slots)
        thin = min(slots, key=lambda sl: sl.samples)
        if thin.samples < k:
            raise PlanError(
                f"epoch {epoch}: slot {thin.slot} holds {thin.samples} samples, too few for {k} batches "
                f"(data.batch_size={batch_size}); use more, smaller shards so slots balance, or fewer workers"
            )
    return EpochPlan(epoch, k, by_atoms, tuple(slots))


def batch_index(position: int, cum_atoms: int, slot: SlotPlan, k: int, by_atoms: bool) -> int:
    """Batch of the sample at `position` in the slot (`cum_atoms` atoms precede it)."""
    return (cum_atoms * k) // slot.atoms if by_atoms else (position * k) // slot.samples


def group_permutation(seed: int, epoch: int, slot: int, group: int, n: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, slot, group, 0x5348]).permutation(n)
