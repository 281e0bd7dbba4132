"""IS2RE / IS2RS metrics against hand-computed values, and AFbT with EMT as the reference calculator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from eqv2.relaxation.engine import AseForces, RelaxConfig, Result, Structure, relax
from eqv2.relaxation.metrics import (ADWT_THRESHOLDS, AFBT_THRESHOLDS, afbt_metrics, is2re_metrics, is2rs_metrics,
                                     load_oracle, min_image_displacement)


def test_threshold_grids_are_oc20s():
    assert len(ADWT_THRESHOLDS) == 490 and ADWT_THRESHOLDS[0] == 0.01 and ADWT_THRESHOLDS[-1] == pytest.approx(0.499)
    assert len(AFBT_THRESHOLDS) == 390 and AFBT_THRESHOLDS[-1] == pytest.approx(0.399)


def test_minimum_image_wraps_periodic_directions_only():
    cell = np.diag([10.0, 10.0, 10.0])
    a, b = np.array([[9.9, 0.0, 9.9]]), np.array([[0.1, 0.0, 0.1]])
    np.testing.assert_allclose(min_image_displacement(a, b, cell, [True, True, False]), [[-0.2, 0.0, 9.8]], atol=1e-12)
    skew = np.array([[4.0, 0.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 20.0]])
    shift = np.array([[0.05, 0.02, 0.0]])
    np.testing.assert_allclose(min_image_displacement(shift + skew[0] + skew[1], np.zeros((1, 3)), skew, [True] * 3), shift,
                               atol=1e-12)


def _result(d_free: float, d_fixed: float, energy: float, target: float) -> Result:
    """Three atoms (one fixed) in a 10 Å cube; free atoms displaced by d_free across the periodic boundary."""
    target_pos = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.99, 1.0, 1.0]])
    pos = (target_pos + np.array([[d_fixed, 0, 0], [0, d_free, 0], [d_free, 0, 0]])) % 10.0  # atom 2 wrapped to x ~ 0.04
    s = Structure(sid="x", numbers=np.array([29, 29, 8]), positions=target_pos + 1.0, cell=np.eye(3) * 10, pbc=np.ones(3, bool),
                  fixed=np.array([True, False, False]), target_positions=target_pos, target_energy=target, initial_energy=target + 0.5)
    return Result(s, pos, energy, 0.0, 0, True)


def test_adwt_and_is2re_by_hand():
    results = [_result(0.0505, 3.0, -1.00, -1.01), _result(0.3005, 0.0, -2.00, -2.03)]
    rs = is2rs_metrics(results)
    # mean free-atom distances 0.0505 and 0.3005 (the fixed atom's 3 Å does not count): below t = 0.01 + 0.001 k
    # for k >= 41 (449 of 490 thresholds) and k >= 291 (199 of 490)
    assert rs["average_distance_within_threshold"] == pytest.approx((449 + 199) / (2 * 490))
    assert rs["mean_free_distance"] == pytest.approx((0.0505 + 0.3005) / 2)
    re = is2re_metrics(results)
    assert re["energy_mae"] == pytest.approx(0.02) and re["energy_within_threshold"] == 0.5
    assert re["energy_mae_initial_baseline"] == pytest.approx(0.5)


class SpringToGrid(Calculator):
    """A real ASE calculator with known forces: every atom is pulled to its nearest integer grid point,
    F = -(r - round(r)) eV/Å, so a structure's largest force is the largest displacement put into it."""
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.get_positions() - np.round(self.atoms.get_positions())
        self.results = {"energy": 0.5 * float((d * d).sum()), "forces": -d}


def _on_grid(sid: str, free_force: float, fixed_force: float) -> Result:
    """Two free atoms (displaced 0.3 * f and f from the grid along x) and one fixed atom displaced by fixed_force."""
    pos = np.array([[1.0 + 0.3 * free_force, 1.0, 1.0], [3.0, 2.0 + free_force, 2.0], [5.0 + fixed_force, 5.0, 5.0]])
    s = Structure(sid=sid, numbers=np.array([29, 29, 29]), positions=pos, cell=np.eye(3) * 20, pbc=np.ones(3, bool),
                  fixed=np.array([False, False, True]))
    return Result(s, pos, 0.0, 0.0, 0, True)


def test_afbt_by_hand():
    """Largest free-atom forces 0.0305, 0.1005 and 0.45 eV/Å (the fixed atoms' 0.3 does not count): below
    t = 0.01 + 0.001 k (k = 0 ... 389) for k >= 21 (369 thresholds), k >= 91 (299) and never; FbT at 0.05: 1 of 3."""
    results = [_on_grid("a", 0.0305, 0.3), _on_grid("b", 0.1005, 0.3), _on_grid("c", 0.45, 0.0)]
    m = afbt_metrics(results, SpringToGrid())
    assert m["average_forces_below_threshold"] == pytest.approx((369 + 299 + 0) / (3 * 390))
    assert m["forces_below_threshold_0.05"] == pytest.approx(1 / 3)
    assert m["num_structures"] == 3


def test_afbt_with_emt_oracle(emt_structures):
    """EMT-relaxed structures (fmax < 0.02) all have forces below 0.05 by EMT; AFbT counts each threshold above
    each structure's largest force; the initial (rattled) structures score lower."""
    relaxed = list(relax(emt_structures, AseForces(EMT()), RelaxConfig(fmax=0.02, steps=300), float_dtype=torch.float64))
    m = afbt_metrics(relaxed, load_oracle("ase.calculators.emt:EMT"))
    assert m["forces_below_threshold_0.05"] == 1.0
    want = np.mean([[r.fmax < t for t in AFBT_THRESHOLDS] for r in relaxed])
    assert m["average_forces_below_threshold"] == pytest.approx(want) and want > 0.97
    unrelaxed = [Result(s, s.positions, 0.0, 0.0, 0, False) for s in emt_structures]
    assert afbt_metrics(unrelaxed, EMT())["average_forces_below_threshold"] < want - 0.1


def test_oracle_spec_errors():
    with pytest.raises(ValueError, match="want module:Class"):
        load_oracle("EMT")
    with pytest.raises(ValueError, match="cannot import Nope"):
        load_oracle("ase.calculators.emt:Nope")


def test_adwt_equals_fairchems_evaluator(emt_structures):
    """Our ADwT against fairchem-core's own IS2RS evaluator, fed as its trainer feeds it (free atoms only, the
    relaxed DFT positions as target): the same threshold grid, minimum image and free-atom mean."""
    import importlib
    import sys

    try:
        import torch_scatter  # noqa: F401  (fairchem imports it at module level; no wheel for current torch)
    except ImportError:
        sys.modules["torch_scatter"] = importlib.import_module("tests.model.fairchem_shim.torch_scatter")
    from fairchem.core.modules.evaluator import average_distance_within_threshold

    rng = np.random.default_rng(0)
    results = []
    for i, s in enumerate(emt_structures):
        pred = s.target_positions + rng.normal(0, 0.02 * (i + 1), size=s.target_positions.shape)
        pred[0] += s.cell[0]  # a whole cell away: the same atom by minimum image
        results.append(Result(s, pred, 0.0, 0.0, 0, True))
    free = [~r.structure.fixed for r in results]
    cat = lambda arrays: torch.tensor(np.concatenate(arrays))
    natoms = torch.tensor([int(f.sum()) for f in free])
    cell = torch.tensor(np.stack([r.structure.cell for r in results]))
    pbc = torch.tensor([True, True, True])
    want = average_distance_within_threshold(
        {"positions": cat([r.positions[f] for r, f in zip(results, free)]), "natoms": natoms, "cell": cell, "pbc": pbc},
        {"positions": cat([r.structure.target_positions[f] for r, f in zip(results, free)]), "natoms": natoms,
         "cell": cell, "pbc": pbc})["metric"]
    got = is2rs_metrics(results)["average_distance_within_threshold"]
    assert 0.05 < got < 0.95 and got == pytest.approx(want, abs=1e-12)
