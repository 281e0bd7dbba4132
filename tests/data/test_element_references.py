"""Per-element reference energies fitted by least squares (eqv2/data/stats.py): the fit recovers known
references, combines exactly over shards, and handles compositions that cannot be told apart."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eqv2.data.stats import Accumulator, combine, load_stats, summarize, write_stats

TRUE_REFS = {1: -3.4, 8: -4.9, 29: -3.7, 47: -2.8}


def _structures(count: int, seed: int, elements=tuple(TRUE_REFS), noise: float = 0.02):
    """(numbers, energy) pairs: random compositions, E = sum ref[Z] + 0.5 + noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        numbers = rng.choice(elements, size=int(rng.integers(3, 30)))
        energy = sum(TRUE_REFS[int(z)] for z in numbers) + 0.5 + noise * rng.standard_normal()
        out.append((numbers, float(energy)))
    return out


def _sample(numbers, energy) -> dict:
    n = len(numbers)
    return {"numbers": np.asarray(numbers), "positions": np.zeros((n, 3)), "cell": np.eye(3), "pbc": np.zeros(3, bool),
            "energy": energy, "forces": np.zeros((n, 3))}


def _stats(structures, shards: int):
    accs = [Accumulator() for _ in range(shards)]
    for i, (numbers, energy) in enumerate(structures):
        accs[i % shards].add(summarize(_sample(numbers, energy), f"s{i}", 0))
    return combine([json.loads(json.dumps(a.to_json())) for a in accs])  # through JSON, as the manifest keeps them


def _direct(structures):
    elements = sorted({int(z) for numbers, _ in structures for z in numbers})
    c = np.array([[np.sum(numbers == z) for z in elements] for numbers, _ in structures], dtype=np.float64)
    e = np.array([energy for _, energy in structures])
    refs, *_ = np.linalg.lstsq(c, e, rcond=None)
    return elements, c, e, refs


def test_the_fit_recovers_known_references():
    structures = _structures(400, seed=0)
    stats = _stats(structures, shards=1)
    assert set(stats.energy_references) == set(TRUE_REFS)
    # the constant 0.5 per structure is spread over the elements (about 0.5 / 16 atoms each): within 0.1
    for z, ref in TRUE_REFS.items():
        assert abs(stats.energy_references[z] - ref) < 0.1, (z, stats.energy_references[z])
    elements, c, e, refs = _direct(structures)
    assert np.allclose([stats.energy_references[z] for z in elements], refs, rtol=0, atol=1e-9)
    residual = e - c @ refs
    assert stats.referenced_energy_mean == pytest.approx(residual.mean(), abs=1e-9)
    assert stats.referenced_energy_std == pytest.approx(residual.std(), rel=1e-6)
    assert stats.referenced_energy_std < 0.1 * stats.energy_std  # the references carry most of the energy


def test_the_fit_is_the_same_over_any_number_of_shards():
    structures = _structures(150, seed=1, noise=0.0)
    one, many = _stats(structures, 1), _stats(structures, 7)
    for z in TRUE_REFS:
        assert many.energy_references[z] == pytest.approx(one.energy_references[z], abs=1e-9)
    assert many.referenced_energy_std == pytest.approx(one.referenced_energy_std, abs=1e-7)


def test_exact_references_leave_no_residual():
    rng = np.random.default_rng(3)
    structures = []
    for _ in range(50):
        numbers = rng.choice(tuple(TRUE_REFS), size=int(rng.integers(2, 12)))
        structures.append((numbers, float(sum(TRUE_REFS[int(z)] for z in numbers))))
    stats = _stats(structures, 3)
    for z, ref in TRUE_REFS.items():
        assert stats.energy_references[z] == pytest.approx(ref, abs=1e-9)
    assert stats.referenced_energy_mean == pytest.approx(0.0, abs=1e-9)
    assert stats.referenced_energy_std == pytest.approx(0.0, abs=1e-5)


def test_elements_always_in_one_proportion_get_the_minimum_norm_split():
    """Only water: H and O cannot be told apart; predicted energies are still the least-squares ones."""
    rng = np.random.default_rng(4)
    structures = []
    for _ in range(40):
        k = int(rng.integers(1, 8))
        numbers = np.array([1, 1, 8] * k)
        structures.append((numbers, k * (2 * TRUE_REFS[1] + TRUE_REFS[8]) + 0.01 * rng.standard_normal()))
    stats = _stats(structures, 2)
    predicted = 2 * stats.energy_references[1] + stats.energy_references[8]
    assert predicted == pytest.approx(2 * TRUE_REFS[1] + TRUE_REFS[8], abs=0.01)
    _, _, _, refs = _direct(structures)
    assert [stats.energy_references[1], stats.energy_references[8]] == pytest.approx(list(refs), abs=1e-6)


def test_stats_json_keeps_the_references(tmp_path):
    stats = _stats(_structures(30, seed=5), 2)
    write_stats(stats, tmp_path / "stats.json")
    back = load_stats(tmp_path / "stats.json")
    assert back.energy_references == pytest.approx(stats.energy_references)
    assert back.referenced_energy_std == stats.referenced_energy_std


def test_older_shard_sums_give_no_references():
    acc = Accumulator()
    acc.add(summarize(_sample(np.array([1, 8]), -10.0), "a", 0))
    old = {k: v for k, v in acc.to_json().items() if not k.startswith("element_")}
    stats = combine([old])
    assert stats.energy_references is None and stats.referenced_energy_std is None
