"""Target normalisation: the one definition used by training, model files and the calculator.

The model predicts (E − energy_mean) / energy_std and F / forces_std.  `forces_std` is fairchem's
name for the force normaliser: a mean of zero and the root mean square of the force components
about zero (`stats.json`'s `forces_std`; fairchem's `rmsd` with mean 0, OC20's `grad_target_std`).
Run checkpoints and configs written before this module called it `force_rms`; `from_mapping` still
reads them.

A gradient-force model (`model.forces: gradient`) outputs derivatives of its normalised energy, so its
forces and stress are in units of energy_std (per Å, per Å^3): the trainer sets forces_std = energy_std
for it, as fairchem's configs set grad_target_std = target_std, and the stress is scaled by energy_std.
Per-element energy references (eV, indexed by atomic number) are added to the denormalised energy
(`structure_references`): the model learns E - sum_atoms ref[Z].

A model with a direct stress head (converted from fairchem's OMat24-family models) predicts the
normalised isotropic and anisotropic parts of the stress (or its normalised components), each with
fairchem's (mean, std) normaliser (`StressNormalizers`); denormalised, they are assembled into the
[B, 3, 3] stress in eV/Å^3 (ASE's sign convention, as fairchem's training data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqv2.model.rank2_head import symmetric_tensor

LEGACY_NAMES = {"force_rms": "forces_std"}  # older eqv2 run checkpoints, configs and stats files


@dataclass
class StressNormalizers:
    """fairchem's stress normalisers (prediction * std + mean), eV/Å^3."""

    isotropic_mean: float = 0.0  # the decomposed head's isotropic part (stress_isotropic)
    isotropic_std: float = 1.0
    anisotropic_mean: float = 0.0  # its anisotropic part (stress_anisotropic; the mean is added to all 5)
    anisotropic_std: float = 1.0
    tensor_mean: float = 0.0  # a head predicting the tensor whole (stress): each of the 9 components
    tensor_std: float = 1.0

    def denormalise(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        if "stress_direct" in out:
            return _wide(out["stress_direct"]) * self.tensor_std + self.tensor_mean
        isotropic = _wide(out["stress_isotropic"]) * self.isotropic_std + self.isotropic_mean
        return symmetric_tensor(isotropic, _wide(out["stress_anisotropic"]) * self.anisotropic_std
                                + self.anisotropic_mean)


@dataclass
class Normalizers:
    energy_mean: float  # eV
    energy_std: float  # eV
    forces_std: float  # eV/Å, RMS of the force components (mean 0)
    stress: StressNormalizers | None = None  # models with a direct stress head only

    def __post_init__(self) -> None:
        if not (self.energy_std > 0 and self.forces_std > 0):
            raise ValueError(f"normaliser scales must be positive, got energy_std={self.energy_std}, "
                             f"forces_std={self.forces_std}")

    @classmethod
    def from_mapping(cls, data: dict) -> "Normalizers":
        """From a saved mapping, accepting the legacy name `force_rms` for `forces_std`."""
        return cls(**renamed_legacy(data))

    def normalise_energy(self, energy: torch.Tensor) -> torch.Tensor:
        return (energy - self.energy_mean) / self.energy_std

    def normalise_forces(self, forces: torch.Tensor) -> torch.Tensor:
        return forces / self.forces_std

    def denormalise(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model outputs in eV and eV/Å, in float32 or wider (bf16 outputs of autocast are widened)."""
        result = {"energy": _wide(out["energy"]) * self.energy_std + self.energy_mean}
        if "forces" in out:
            result["forces"] = _wide(out["forces"]) * self.forces_std
        if "stress" in out:  # the derivative of the normalised energy (gradient models)
            result["stress"] = _wide(out["stress"]) * self.energy_std
        elif "stress_isotropic" in out or "stress_direct" in out:  # a direct stress head
            result["stress"] = (self.stress or StressNormalizers()).denormalise(out)
        return result

    def normalise_stress(self, stress: torch.Tensor) -> torch.Tensor:
        return stress / self.energy_std


def structure_references(references: torch.Tensor, atomic_numbers: torch.Tensor, graph_of_atom: torch.Tensor,
                         num_graphs: int) -> torch.Tensor:
    """[B] float64: the sum of `references` [Z] (eV) over the atoms of each structure."""
    per_atom = references.to(torch.float64)[atomic_numbers]
    return per_atom.new_zeros(num_graphs).index_add(0, graph_of_atom, per_atom)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def renamed_legacy(data: dict) -> dict:
    """`data` with legacy keys renamed (a mapping holding both spellings keeps the new one)."""
    out = dict(data)
    for old, new in LEGACY_NAMES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out
