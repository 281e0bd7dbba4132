"""eqv2.data.validate: the frame and label checks every sharder and the training stream apply."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from eqv2.data.format import SampleError
from eqv2.data.validate import LabelBounds, atomic_numbers, check_labels, coincident_pair, validate_frame

from .conftest import oc20_frames, with_energy


def _brute_force_min(pos, cell, pbc, reach: int = 5) -> float:
    """Smallest distance between two different atoms over every image within `reach` cells (the
    reference; atoms may lie several cells away from the home cell)."""
    axes = [range(-reach, reach + 1) if p else (0,) for p in pbc]
    shifts = np.array(list(itertools.product(*axes)), dtype=np.float64) @ cell  # [S, 3]
    i, j = np.triu_indices(len(pos), 1)
    d = np.linalg.norm(pos[j][:, None, :] + shifts[None] - pos[i][:, None, :], axis=-1)  # [pairs, S]
    return float(d.min()) if d.size else np.inf


@pytest.fixture(scope="module")
def sample() -> dict:
    return with_energy(oc20_frames(1, seed=4))[0]


def test_real_structure_passes(sample):
    assert validate_frame(sample, "f frame 0") == len(sample["numbers"])
    check_labels(sample, "f frame 0", LabelBounds())
    assert coincident_pair(sample["positions"], sample["cell"], sample["pbc"]) is None


def test_coincident_pairs_match_brute_force():
    """Random skewed cells, mixed periodicity; one atom put next to another or to an image of it (across
    one, two or three faces, from either side), or not: the search agrees with a 27-image brute force."""
    found_close = 0
    for seed in range(150):
        rng = np.random.default_rng(seed)
        cell = np.diag(rng.uniform(3, 8, 3)) + np.triu(rng.uniform(-2, 2, (3, 3)), 1)
        pbc = rng.random(3) < 0.8
        n = int(rng.integers(2, 12))
        frac = rng.random((n, 3))
        if seed % 4:  # an atom at a face/edge/corner and a second one near it or just across it
            frac[0] = np.where(rng.random(3) < 0.5, rng.choice([1e-4, 1 - 1e-4], 3), frac[0])
            target = frac[0] + np.where(pbc & (rng.random(3) < 0.7), np.sign(0.5 - frac[0]), 0)
            frac[1] = target + rng.normal(0, 1e-3 if seed % 3 else 1e-2, 3) / np.diag(cell)
        pos = frac @ cell + (rng.integers(-2, 3, (n, 3)) * pbc) @ cell  # some atoms outside the home cell
        ref = _brute_force_min(pos, cell, pbc)
        found = coincident_pair(pos, cell, pbc)
        if ref < 0.01:
            found_close += 1
            assert found is not None and found[2] < 0.01, (seed, ref)
            i, j, d = found
            assert _brute_force_min(pos[[i, j]], cell, pbc) == pytest.approx(d, abs=1e-9), seed
        else:
            assert found is None, (seed, ref, found)
    assert found_close > 30  # the cases above put atoms within 0.01 Å often enough to test something


def test_coincident_through_periodic_image_only(sample):
    pos = np.array(sample["positions"], dtype=np.float64)
    cell = np.asarray(sample["cell"], dtype=np.float64)
    pos[7] = pos[2] + cell[0] - cell[1] + 0.004
    with pytest.raises(SampleError, match=r"^f frame 3: atoms 2 and 7 coincide \(distance 6.93e-03 Å"):
        validate_frame(dict(sample, positions=pos), "f frame 3")
    # without periodicity the two atoms are a cell apart: a valid molecule-like structure
    assert coincident_pair(pos, cell, [False, False, False]) is None


def test_unknown_symbol_and_empty_frame(sample):
    assert atomic_numbers(["H", "Cu", "Og"], "w").tolist() == [1, 29, 118]
    with pytest.raises(SampleError, match=r"^w: unknown element symbol 'Xx' \(atom 1\)$"):
        atomic_numbers(["H", "Xx"], "w")
    empty = dict(sample, positions=np.zeros((0, 3)), numbers=np.zeros(0, np.uint8), tags=None, fixed=None,
                 forces=None)
    with pytest.raises(SampleError, match=r"^w: no atoms"):
        validate_frame(empty, "w")


@pytest.mark.parametrize("change, message", [
    (dict(energy=1e30), r"\|energy\| per atom is .* above the bound of 100 eV \(if real, raise --max-energy-per-atom"),
    (dict(total_energy=-1e5), r"\|total_energy\| per atom is"),
    (dict(energy=float("nan")), r"energy is nan"),
    (dict(forces=None), r"no forces \(eqv2 trains on energies and forces"),
    (dict(energy=None), r"no energy \("),
])
def test_label_checks(sample, change, message):
    with pytest.raises(SampleError, match="^s: " + message):
        check_labels(dict(sample, **change), "s", LabelBounds())


def test_force_bound_names_atom_and_is_configurable(sample):
    forces = np.array(sample["forces"], dtype=np.float32)
    forces[5, 1] = -2794.0
    bad = dict(sample, forces=forces)
    with pytest.raises(SampleError, match=r"^s: force component 2794 eV/Å on atom 5, above the bound 100 eV/Å"):
        check_labels(bad, "s", LabelBounds())
    check_labels(bad, "s", LabelBounds(max_force=3000.0))
    check_labels(dict(sample, energy=1e4), "s", LabelBounds(max_energy_per_atom=1e3))
    with pytest.raises(ValueError, match="max_force must be a positive finite number"):
        LabelBounds(max_force=0.0)
