"""ASE calculator backed by an eqv2 model checkpoint: energy (eV) and forces (eV/Å).

    from eqv2.calculator import EquiformerV2Calculator
    atoms.calc = EquiformerV2Calculator("model.pt")          # GPU when available
    atoms.get_potential_energy(); atoms.get_forces()

The energy is what the model was trained on: for OC20 S2EF models, the DFT energy referenced to
the gas-phase/slab references (adsorption-style), as in the published models.
"""
from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from eqv2.batch import AtomsBatch
from eqv2.checkpoint import Potential, load_model


def atoms_to_batch(structures: list[Atoms], ids: list[str] | None = None) -> AtomsBatch:
    """Batch ASE structures (positions, numbers, cell, pbc; tags and FixAtoms when present)."""
    arrays = []
    for atoms in structures:
        fixed = np.zeros(len(atoms), dtype=bool)
        for constraint in atoms.constraints:
            if type(constraint).__name__ == "FixAtoms":
                fixed[constraint.get_indices()] = True
        arrays.append(dict(positions=atoms.get_positions(), numbers=atoms.get_atomic_numbers(),
                           cell=np.array(atoms.get_cell()), pbc=atoms.get_pbc(), tags=atoms.get_tags(), fixed=fixed))
    return AtomsBatch.from_arrays(arrays, ids=ids)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EquiformerV2Calculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, checkpoint: str | Potential, device: str | torch.device | None = None, **kwargs):
        super().__init__(**kwargs)
        self.device = torch.device(device) if device is not None else default_device()
        self.potential = checkpoint if isinstance(checkpoint, Potential) else load_model(checkpoint, self.device)
        self.potential = self.potential.to(self.device).eval()

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        batch = atoms_to_batch([self.atoms], ids=[self.atoms.get_chemical_formula()]).to(self.device)
        with torch.no_grad():
            out = self.potential(batch)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy}
        if "forces" in out:
            self.results["forces"] = out["forces"].double().cpu().numpy()
