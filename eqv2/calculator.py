"""ASE calculator backed by an eqv2 model checkpoint: energy (eV), forces (eV/Å) and, for models with a
stress output, stress (ASE's Voigt order and sign, eV/Å^3).

    from eqv2.calculator import EquiformerV2Calculator
    atoms.calc = EquiformerV2Calculator("model.pt")          # GPU when available
    atoms.get_potential_energy(); atoms.get_forces()
    # on a GPU, the fast path (bf16, fused kernels, compiled; first call checked against float32):
    from eqv2.inference import InferenceOptions
    atoms.calc = EquiformerV2Calculator("model.pt", inference=InferenceOptions(precision="auto"))

The energy is what the model was trained on: for OC20 S2EF models, the DFT energy referenced to
the gas-phase/slab references (adsorption-style), as in the published models.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from eqv2.batch import AtomsBatch
from eqv2.checkpoint import Potential, load_model
from eqv2.data.ase_source import fixed_atoms


def wrapped_positions(atoms: Atoms) -> np.ndarray:
    """Positions wrapped into the cell along its periodic axes, in float64 (ASE's wrap_positions, eps=0, on the
    completed cell, as fairchem's AtomsToGraphs does before its float32 cast).  The function of the positions is
    unchanged (a lattice translation of an atom); its float32 round-off then is fairchem's.  Unchanged where a
    periodic axis has no cell vector (the model reports that cell)."""
    from ase.geometry import wrap_positions

    cell, pbc = np.array(atoms.get_cell(complete=True)), atoms.get_pbc()
    if not pbc.any() or not np.asarray(atoms.get_cell())[pbc].any(axis=1).all():
        return atoms.get_positions()
    return wrap_positions(atoms.get_positions(), cell, pbc=pbc, eps=0)


def atoms_to_batch(structures: list[Atoms], ids: list[str] | None = None) -> AtomsBatch:
    """Batch ASE structures (positions wrapped into the cell, numbers, cell, pbc; tags and FixAtoms when
    present)."""
    arrays = []
    for atoms in structures:
        arrays.append(dict(positions=wrapped_positions(atoms), numbers=atoms.get_atomic_numbers(),
                           cell=np.array(atoms.get_cell()), pbc=atoms.get_pbc(), tags=atoms.get_tags(),
                           fixed=fixed_atoms(atoms)))
    return AtomsBatch.from_arrays(arrays, ids=ids)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def cpu_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside the block and restored after (None: unchanged)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EquiformerV2Calculator(Calculator):
    """threads: torch's intra-op threads while a CPU calculation runs (None: torch's own setting, one per
    core). One by default: on a loaded 2-core machine the 31M model took 3.8 s per OC20 structure
    (34 atoms) with one thread and 9.3 s with two, and ASE workflows often run one calculator per core.
    inference: how the model runs (eqv2.inference.InferenceOptions; None: the float32 reference path); a
    checkpoint given as an already prepared `InferencePotential` runs as it was prepared."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, checkpoint: str | Potential, device: str | torch.device | None = None,
                 threads: int | None = 1, inference=None, **kwargs):
        super().__init__(**kwargs)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.threads = threads
        self.device = torch.device(device) if device is not None else default_device()
        from eqv2.inference import InferencePotential, prepare

        self.potential = checkpoint if isinstance(checkpoint, (Potential, InferencePotential)) \
            else load_model(checkpoint, self.device)
        self.potential = self.potential.to(self.device).eval()
        if inference is not None and not isinstance(self.potential, InferencePotential):
            self.potential = prepare(self.potential, self.device, inference)
        if self.potential.config.forces == "gradient" or self.potential.config.stress_head is not None:
            # stress from the energy's strain derivative, or a direct stress head (converted OMat24-family models)
            self.implemented_properties = [*self.implemented_properties, "stress"]

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = atoms_to_batch([self.atoms], ids=[self.atoms.get_chemical_formula()]).to(self.device)
        with torch.no_grad(), cpu_threads(self.threads if self.device.type == "cpu" else None):
            out = self.potential(batch)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy}
        if "forces" in out:
            self.results["forces"] = out["forces"].double().cpu().numpy()
        if "stress" in out and bool(torch.isfinite(out["stress"]).all()):  # not for cells without volume
            from ase.stress import full_3x3_to_voigt_6_stress

            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].double().cpu().numpy())
