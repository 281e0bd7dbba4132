"""Energy + force loss on normalised targets, normalised by *global* counts.

The reference objective is  λE · mean_s |Ê_s − E_s|  +  λF · mean_i ‖F̂_i − F_i‖₂  over structures s and
free atoms i of the whole (global) batch.  Under data parallelism every rank only sees its own atoms, and
DeepSpeed averages gradients over ranks and micro-steps.  If each rank divided by its *local* count, a rank
holding 10 free atoms would weigh each atom 10× more than a rank holding 100, so the gradient would depend
on how atoms happen to fall on ranks.  We therefore divide by the global counts of the optimizer step
(all-reduced once per step, on device: no host sync) and multiply by world_size × grad_accum to undo
DeepSpeed's averaging, which makes the update identical to a single process on the concatenated batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqv2.batch import AtomsBatch
from eqv2.config import ConfigError
from eqv2.normalizers import Normalizers, structure_references
from eqv2.training.dist import all_reduce_sum

__all__ = ["EnergyForceLoss", "LossConfig", "Normalizers", "free_atom_mask", "global_counts", "local_counts",
           "loss_term_names"]


@dataclass
class LossConfig:
    energy_coef: float = 4.0  # λE; the paper uses 2 or 4 on OC20
    force_coef: float = 100.0  # λF; reference 100
    train_on_free_atoms: bool = True  # fixed (sub-surface) atoms carry no force loss, as the reference
    max_nonfinite_steps: int = 20  # a run with this many steps holding a non-finite loss stops (exit 1)
    # λS: weight of the stress term, mean over structures of |σ̂ - σ|_F in units of energy_std / Å^3
    # (model.forces: gradient; the training data must carry stress)
    stress_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.energy_coef < 0 or self.force_coef < 0 or self.stress_coef < 0:
            raise ValueError("loss coefficients must be non-negative")
        if self.max_nonfinite_steps < 1:
            raise ValueError("max_nonfinite_steps must be >= 1")


def loss_term_names(cfg: LossConfig) -> tuple[str, ...]:
    """The terms EnergyForceLoss reports under `cfg` (the keys of its terms dict), the loss first."""
    return ("loss", "energy_mae_norm", "force_l2mae_norm") + (("stress_l2mae_norm",) if cfg.stress_coef > 0 else ())


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def free_atom_mask(batch: AtomsBatch, free_only: bool) -> torch.Tensor:
    """[N] bool: atoms whose forces count (all atoms when the data has no `fixed` flags)."""
    if free_only and batch.fixed is not None:
        return ~batch.fixed
    return torch.ones_like(batch.atomic_numbers, dtype=torch.bool)


def local_counts(batch: AtomsBatch, free_only: bool) -> torch.Tensor:
    """[3] float64: (structures, free atoms, atoms) of one micro-batch, summed over a step and ranks."""
    n_free = free_atom_mask(batch, free_only).sum()
    # new_full: filled on the device (new_tensor would copy from the host, a synchronous copy on a GPU)
    n_atoms = n_free.new_full((), batch.atomic_numbers.shape[0])
    return torch.stack([n_free.new_full((), batch.num_graphs), n_free, n_atoms]).double()


def global_counts(micro_batches: list[AtomsBatch], free_only: bool, device: torch.device) -> torch.Tensor:
    """[3] float64 on device: structures, free atoms, atoms of the whole optimizer step on all ranks."""
    counts = sum(local_counts(b, free_only) for b in micro_batches).to(device)
    return all_reduce_sum(counts)


class EnergyForceLoss:
    """Weighted energy MAE + force L2-MAE (+ stress L2-MAE) whose gradient is independent of the rank layout.

    references: per-element energies [Z] (eV, on the batches' device) subtracted from the target energy
    before normalisation (data.energy_target: fitted_references), or None."""

    def __init__(self, cfg: LossConfig, normalizers: Normalizers, references: torch.Tensor | None = None):
        self.cfg = cfg
        self.norm = normalizers
        self.references = references

    def __call__(self, out: dict[str, torch.Tensor], batch: AtomsBatch, step_counts: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one micro-batch.

        step_counts: [3] global (structures, free atoms, atoms) of the optimizer step;
        scale: world_size × grad_accum, undoing DeepSpeed's gradient averaging.
        Returns the loss to back-propagate and the detached *global-normalised* terms, which summed
        over micro-batches and ranks give the objective of the step.
        """
        if batch.energy is None or batch.forces is None:
            raise ValueError(f"training batch without energy/forces targets (ids {batch.ids[:3]}...)")
        # float32 or wider (bf16 outputs of autocast are widened; a float64 run stays float64)
        energy = batch.energy
        if self.references is not None:
            refs = structure_references(self.references, batch.atomic_numbers, batch.batch, batch.num_graphs)
            energy = (energy.double() - refs).to(torch.promote_types(energy.dtype, torch.float32))
        e_err = _wide(out["energy"]) - self.norm.normalise_energy(energy)  # [B]
        f_err = _wide(out["forces"]) - self.norm.normalise_forces(batch.forces)  # [N, 3]
        mask = free_atom_mask(batch, self.cfg.train_on_free_atoms)  # [N]
        n_struct = step_counts[0].to(e_err.dtype).clamp_min(1.0)
        n_free = step_counts[1].to(f_err.dtype).clamp_min(1.0)
        energy_term = e_err.abs().sum() / n_struct  # share of the global energy MAE
        force_term = (torch.linalg.vector_norm(f_err, dim=-1) * mask).sum() / n_free  # global L2-MAE share
        loss = self.cfg.energy_coef * energy_term + self.cfg.force_coef * force_term
        terms = {"energy_mae_norm": energy_term.detach(), "force_l2mae_norm": force_term.detach()}
        if self.cfg.stress_coef > 0:
            if batch.stress is None:
                raise ConfigError(f"loss.stress_coef={self.cfg.stress_coef}: the training data has no stress "
                                  f"(batch {batch.ids[:3]}); shard data with stress or set loss.stress_coef: 0")
            s_err = _wide(out["stress"]) - self.norm.normalise_stress(batch.stress)  # [B, 3, 3]
            stress_term = torch.linalg.matrix_norm(s_err).sum() / n_struct  # Frobenius, per structure
            loss = loss + self.cfg.stress_coef * stress_term
            terms["stress_l2mae_norm"] = stress_term.detach()
        terms["loss"] = loss.detach()
        return loss * scale, terms
