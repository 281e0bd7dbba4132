"""Epoch planning from the manifest alone: which shards each (rank, worker) slot reads, in what
order, and how its samples are cut into batches so that every slot yields the same number.

Policy (also in docs/data.md):
1. Slots.  A rank with W' = max(1, num_workers) DataLoader workers owns slots rank*W' ... rank*W'+W'-1;
   there are world_size*W' slots.  Each epoch the shards are permuted by (seed, epoch) and dealt, in
   that order, to the slot with the smallest load so far (samples for `batch_size`, atoms for
   `max_atoms`), so every shard is read by exactly one slot: each sample exactly once per epoch.
2. Equal steps.  Every slot yields exactly K batches, K being the same for all slots and computed
   here from the manifest: K = max over slots of ceil(m_s / B) with `batch_size` B, or of
   ceil(A_s / (M - n_max + 1)) with `max_atoms` M (m_s samples and A_s atoms in slot s, n_max the
   largest structure).  A slot walks its samples in order and starts a new batch when the current
   one would exceed B structures or M atoms, when it has fallen behind the even schedule
   (sample position p, or atoms before it c, past the (b+1)/K mark: floor(p*K/m_s) > b or
   floor(c*K/A_s) > b), or when exactly one sample per remaining batch is left.  Following the
   schedule a batch holds < A_s/K + n_max <= M + 1 atoms, so the cap never forces it ahead, and the
   last rule guarantees K non-empty batches whenever m_s >= K (checked here, before any step).
   Nothing is dropped or repeated.
3. Shuffle.  Within a slot, consecutive shards are grouped until a group holds at least
   `shuffle_buffer` samples; each group is loaded whole and permuted by (seed, epoch, slot, group).
   Memory stays at one group per worker.  A slot's position (next sample p, atoms before it c) is
   all that is needed to resume it; resuming reloads one group.
4. Packing (`max_atoms` with `pack_batches`).  Taken in random order, a batch overshoots its (b+1)/K
   mark by part of one structure, so batches differ by up to a structure's atoms and in a synchronous
   step every rank waits for the largest.  `pack_order` reorders each loaded group so that the sample
   that closes a batch lands near its mark (and the gap before it stays one the sizes present can
   fill), leaving the other samples in their random order.  It depends only on the group's samples and the atoms of
   the slot's earlier groups (from the manifest), so resuming reloads the group into the same order.
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
            f"write more, smaller shards (eqv2 shard* --shard-samples) or lower data.num_workers"
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
    else:
        k = max(math.ceil(sl.samples / batch_size) for sl in slots)
    thin = min(slots, key=lambda sl: sl.samples)
    if thin.samples < k:
        raise PlanError(
            f"epoch {epoch}: slot {thin.slot} holds {thin.samples} samples, too few for the {k} batches every "
            f"slot must yield (batch_size={batch_size}, max_atoms={max_atoms}); use more, smaller shards so "
            f"slots balance, a larger batch, or fewer workers"
        )
    return EpochPlan(epoch, k, by_atoms, tuple(slots))


def starts_new_batch(slot: SlotPlan, k: int, batch_size: int, max_atoms: int, b: int, count: int, atoms: int,
                     position: int, cum: int, natoms: int) -> bool:
    """Whether the sample at `position` (`cum` atoms before it, `natoms` its own) opens batch b+1,
    given that batch b holds `count` samples with `atoms` atoms so far (see the module docstring)."""
    if count == 0 or b + 1 >= k:
        return False
    if max_atoms:
        return atoms + natoms > max_atoms or (cum * k) // slot.atoms > b or slot.samples - position <= k - 1 - b
    return count >= batch_size or (position * k) // slot.samples > b or slot.samples - position <= k - 1 - b


def group_permutation(seed: int, epoch: int, slot: int, group: int, n: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, slot, group, 0x5348]).permutation(n)


def pack_order(order: list[int], sizes: list[int], cum0: int, slot_atoms: int, k: int) -> list[int]:
    """`order` (a permutation of a group's samples, `sizes` their atom counts indexed by sample) rearranged
    so that each batch of the even schedule ends close to its mark c_b = (b+1)*slot_atoms/K.  Walking
    the samples from `cum0` atoms (those of the slot's earlier groups), with g atoms left to the next
    mark:
    - g within one structure (g <= the largest size): the smallest remaining sample of at least g atoms
      closes the batch (the largest remaining if none has g);
    - otherwise the next sample in random order, unless the gap it leaves cannot be made of the sizes
      present (e.g. 0 < gap < the smallest): then the first size, largest first, that leaves a gap
      that can.
    So batches end within a few atoms of their marks instead of anywhere within a structure's size;
    the other samples keep their random order.  Samples of size 0 (unreadable, skipped later) are
    taken where they are."""
    present = sorted({sz for sz in sizes if sz})
    if not present:
        return list(order)
    n_max = present[-1]
    horizon = 3 * n_max  # gaps beyond it are taken as fillable
    fillable = [True] + [False] * horizon  # a gap of r atoms is a sum of sizes present
    for r in range(1, horizon + 1):
        fillable[r] = any(sz <= r and fillable[r - sz] for sz in present)
    by_size: list[list[int]] = [[] for _ in range(n_max + 1)]  # positions in `order` per size, earliest last
    for pos in reversed(range(len(order))):
        by_size[sizes[order[pos]]].append(pos)
    taken = [False] * len(order)

    def first_free(sizes_to_try) -> int | None:
        for size in sizes_to_try:
            stack = by_size[size]
            while stack and taken[stack[-1]]:
                stack.pop()
            if stack:
                return stack[-1]
        return None

    out, cum, nxt = [], cum0, 0
    while len(out) < len(order):
        while taken[nxt]:
            nxt += 1
        pick, size = nxt, sizes[order[nxt]]
        gap = math.ceil((cum * k // slot_atoms + 1) * slot_atoms / k - cum)  # atoms to the next mark
        if size and gap <= n_max:  # close the batch at its mark
            pick = first_free([*range(max(gap, 1), n_max + 1), *range(gap - 1, 0, -1)])
        elif size and gap - size <= horizon and not fillable[gap - size]:  # keep the gap fillable
            found = first_free([sz for sz in reversed(present) if gap - sz > horizon or fillable[gap - sz]])
            pick = nxt if found is None else found
        taken[pick] = True
        out.append(order[pick])
        cum += sizes[order[pick]]
    return out
