"""eqv2.data.plan.pack_order: batches by atoms that end near their marks, so ranks' batches are alike."""
from __future__ import annotations

import numpy as np
import pytest

from eqv2.data.plan import pack_order
from tests.data.test_stream import _cfg, _epoch


def _batch_atoms(order: list[int], sizes: list[int], cum0: int, total: int, k: int) -> np.ndarray:
    """Atoms per batch when `order` is cut by the even schedule (a new batch once the atoms before a
    sample pass the next (b+1)/K mark), as the reader cuts it."""
    out, cum, b, current = [], cum0, cum0 * k // total, 0
    for j in order:
        if cum * k // total > b and current:
            out.append(current)
            current, b = 0, b + 1
        current += sizes[j]
        cum += sizes[j]
    return np.array(out + [current])


@pytest.mark.parametrize("low,high", [(10, 226), (49, 85), (5, 30)])
def test_packed_batches_end_near_their_marks(low, high):
    rng = np.random.default_rng(low)
    sizes = rng.integers(low, high, 2000).tolist()
    order = rng.permutation(2000).tolist()
    total, k = sum(sizes), 250
    packed = pack_order(order, sizes, 0, total, k)
    assert sorted(packed) == list(range(2000))  # a reordering: every sample once
    assert pack_order(order, sizes, 0, total, k) == packed  # deterministic (resume reloads the same order)
    plain, tight = _batch_atoms(order, sizes, 0, total, k), _batch_atoms(packed, sizes, 0, total, k)
    assert len(plain) == len(tight) == k
    # random order: batches differ by about a structure's size; packed: by a few atoms, except where the
    # group runs out of choices at its end
    assert np.std(tight) < 0.35 * np.std(plain), (np.std(plain), np.std(tight))
    assert np.median(np.abs(tight - total / k)) <= 2


def test_packing_starts_from_the_slots_earlier_atoms_and_keeps_unreadable_samples():
    sizes = [20, 0, 30, 25, 20, 35, 30, 20, 25, 30]
    order = list(range(10))
    packed = pack_order(order, sizes, 130, 470, 10)  # marks every 47 atoms; 130 atoms before this group
    assert sorted(packed) == order and packed.index(1) <= 2  # the size-0 sample is not held back
    assert pack_order(order, [0] * 10, 0, 10, 2) == order


def test_packing_reorders_within_each_rank_only(uneven_dir):
    """Each rank reads the same samples with and without packing (only their order changes), and every
    sample is read once either way."""
    per_rank = {}
    for pack in (True, False):
        cfg = _cfg(uneven_dir, num_workers=2, max_atoms=120, pack_batches=pack)
        per_rank[pack] = [[i for b in batches for i in b.ids] for batches in _epoch(cfg, 2, 0)]
    assert [sorted(r) for r in per_rank[True]] == [sorted(r) for r in per_rank[False]]
    assert per_rank[True] != per_rank[False]
