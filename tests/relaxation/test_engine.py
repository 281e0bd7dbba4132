"""The batched engine against ASE's own optimizers with EMT forces, batched against one at a time, fixed atoms,
the atom budget with refill, and the step limit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.optimize import FIRE

from eqv2.relaxation.engine import AseForces, RelaxConfig, relax
from tests.relaxation.conftest import FMAX, STEPS


class CountingEMT(AseForces):
    """EMT forces, recording the atoms and structures of every batch the engine evaluates."""

    def __init__(self):
        super().__init__(EMT())
        self.batches = []

    def __call__(self, batch):
        self.batches.append((int(batch.natoms.sum()), batch.num_graphs))
        return super().__call__(batch)


def _run(structures, cfg, provider=None):
    return {r.structure.sid: r for r in relax(structures, provider or AseForces(EMT()), cfg, float_dtype=torch.float64)}


def test_lbfgs_matches_ase_lbfgs(emt_set, emt_structures):
    provider = CountingEMT()
    got = _run(emt_structures, RelaxConfig(fmax=FMAX, steps=STEPS, max_atoms=40), provider)
    assert max(n for n, _ in provider.batches) <= 40 and max(b for _, b in provider.batches) >= 2
    for atoms, relaxed, steps in emt_set:
        r = got[atoms.info["sid"]]
        relaxed.calc = EMT()
        assert r.converged and r.steps == steps, (r.steps, steps)
        np.testing.assert_allclose(r.positions, relaxed.get_positions(), atol=1e-8)
        assert abs(r.energy - relaxed.get_potential_energy()) < 1e-8
        assert r.fmax < FMAX


def test_fire_matches_ase_fire(emt_set, emt_structures):
    got = _run(emt_structures[:3], RelaxConfig(optimizer="fire", fmax=FMAX, steps=STEPS, max_atoms=30))
    for atoms, _, _ in emt_set[:3]:
        ref = atoms.copy()
        ref.calc = EMT()
        opt = FIRE(ref, logfile=None)
        opt.run(fmax=FMAX, steps=STEPS)
        r = got[atoms.info["sid"]]
        assert r.steps == opt.nsteps
        np.testing.assert_allclose(r.positions, ref.get_positions(), atol=1e-8)


@pytest.mark.parametrize("optimizer", ["lbfgs", "fire"])
def test_batched_equals_one_at_a_time(emt_structures, optimizer):
    batched = _run(emt_structures, RelaxConfig(optimizer=optimizer, fmax=FMAX, steps=STEPS, max_atoms=10_000))
    single = _run(emt_structures, RelaxConfig(optimizer=optimizer, fmax=FMAX, steps=STEPS, max_structures=1))
    assert batched.keys() == single.keys()
    for sid in batched:
        assert batched[sid].steps == single[sid].steps
        np.testing.assert_allclose(batched[sid].positions, single[sid].positions, atol=1e-10)
        assert batched[sid].energy == pytest.approx(single[sid].energy, abs=1e-10)


def test_fixed_atoms_do_not_move(emt_structures):
    got = _run(emt_structures, RelaxConfig(fmax=FMAX, steps=STEPS, max_atoms=60))
    for s in emt_structures:
        r = got[s.sid]
        assert s.fixed.sum() >= 4
        np.testing.assert_array_equal(r.positions[s.fixed], s.positions[s.fixed])
        assert np.abs(r.positions[~s.fixed] - s.positions[~s.fixed]).max() > 1e-3


def test_refill_keeps_the_batch_full(emt_structures):
    """A budget of two structures: a finished one leaves and a queued one takes its place in the next batch,
    so every batch holds two structures while two are unfinished; each structure comes out once."""
    provider = CountingEMT()
    finished_after = []  # evaluations done when each result came out
    results = []
    for r in relax(emt_structures, provider, RelaxConfig(fmax=FMAX, steps=STEPS, max_structures=2), float_dtype=torch.float64):
        finished_after.append(len(provider.batches))
        results.append(r)
    assert sorted(r.structure.sid for r in results) == sorted(s.sid for s in emt_structures)
    for k, (_, size) in enumerate(provider.batches):
        unfinished = len(emt_structures) - sum(c <= k for c in finished_after)
        assert size == min(2, unfinished), (k, size, unfinished)
    assert len(provider.batches) < sum(r.steps + 1 for r in results)  # batching shared the evaluations


def test_step_limit(emt_structures):
    got = _run(emt_structures[:2], RelaxConfig(fmax=1e-6, steps=5, max_atoms=100))
    for r in got.values():
        assert r.steps == 5 and not r.converged and r.fmax > 1e-6


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="optimizer"):
        RelaxConfig(optimizer="bfgs")


def test_the_model_sees_wrapped_positions_and_the_optimizer_keeps_its_own():
    """Atoms moved out of the cell by lattice vectors: the force provider gets the positions wrapped into the
    cell as the ASE calculator's batches hold them (eqv2.calculator.atoms_to_batch: the same float32 inputs, so
    the same tied neighbours), the energies are those of the unmoved structure, and the results keep the
    optimizer's unwrapped positions."""
    from eqv2.calculator import atoms_to_batch
    from tests.relaxation.emt_set import initial_atoms, structure_of

    atoms = [initial_atoms(i) for i in range(3)]
    moved = []
    for a in atoms:
        b = a.copy()
        cell, pos = np.array(b.get_cell()), b.get_positions()
        pos[::2] += cell[0] - 2 * cell[1]  # out of the cell along both periodic axes
        pos[1::3] -= cell[0]
        b.set_positions(pos)
        moved.append(b)
    seen = []

    class Recording(AseForces):
        def __call__(self, batch):
            seen.append(batch.pos.clone())
            return super().__call__(batch)

    cfg = RelaxConfig(fmax=1e-9, steps=0)
    got = {r.structure.sid: r for r in relax([structure_of(b) for b in moved], Recording(EMT()), cfg)}
    want = _run([structure_of(a) for a in atoms], cfg)
    got64 = _run([structure_of(b) for b in moved], cfg)  # float64 inputs: the energies of the unmoved structures
    expected = atoms_to_batch(moved).pos
    assert not torch.equal(expected, torch.as_tensor(np.concatenate([b.get_positions() for b in moved]), dtype=torch.float32))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=2e-6)
    for b in moved:
        sid = b.info["sid"]
        assert got64[sid].energy == pytest.approx(want[sid].energy, abs=1e-9)
        assert got[sid].energy == pytest.approx(want[sid].energy, abs=1e-5)  # float32 inputs
        np.testing.assert_array_equal(got[sid].positions, b.get_positions())
