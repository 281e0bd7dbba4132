"""S2EF validation metrics, aggregated exactly across ranks.

Every metric is kept as (sum, count) pairs in float64 on device and all-reduced once at the end of an
evaluation, so the result equals the metric of the concatenated validation set regardless of how its
structures were split over ranks and batches (a mean of per-rank means would not be).
Units are physical (eV, eV/Å): predictions are denormalised before comparison.

Definitions follow the OC20 S2EF evaluation:
- energy MAE: mean |ΔE| over structures;
- force MAE: mean |ΔF| over the x, y, z components of free atoms;
- force cosine: mean cosine similarity of predicted and true force vectors over free atoms;
- EwT: fraction of structures with |ΔE| < 0.02 eV and max |ΔF| component < 0.03 eV/Å over its free atoms;
- stress MAE (models that predict stress, data that has it): mean |Δσ| over the 9 components, eV/Å^3.
Beside them, the baselines a model must beat: predicting zero (energy and forces) and predicting the
training set's mean energy (`energy_mae_mean_baseline`, the normaliser's energy_mean).
"""
from __future__ import annotations

import torch

from eqv2.batch import AtomsBatch
from eqv2.normalizers import structure_references
from eqv2.training.dist import all_reduce_sum
from eqv2.training.loss import free_atom_mask

ENERGY_THRESHOLD = 0.02  # eV, OC20 EwT
FORCE_THRESHOLD = 0.03  # eV/Å, OC20 EwT

# index of each running sum in the accumulator vector
_KEYS = ("energy_abs", "n_struct", "force_abs", "n_force_comp", "force_cos", "n_free", "ewt_hits",
         "energy_zero_abs", "force_zero_abs", "energy_mean_abs", "stress_abs", "n_stress")


class S2EFMetrics:
    """Running sums for one validation split."""

    def __init__(self, device: torch.device, free_only: bool = True, energy_mean: float = 0.0,
                 references: torch.Tensor | None = None):
        """energy_mean: the constant prediction of the mean baseline (the training set's mean energy);
        with per-element `references` [Z] (eV), the baseline is energy_mean + the structure's references."""
        self.sums = torch.zeros(len(_KEYS), dtype=torch.float64, device=device)
        self.free_only = free_only
        self.energy_mean = float(energy_mean)
        self.references = references

    @torch.no_grad()
    def update(self, pred: dict[str, torch.Tensor], batch: AtomsBatch) -> None:
        """pred: denormalised {"energy": [B], "forces": [N, 3]}; batch carries the targets."""
        e_err = (pred["energy"].double() - batch.energy.double()).abs()  # [B]
        f_true = batch.forces.double()  # [N, 3]
        f_err = (pred["forces"].double() - f_true).abs()  # [N, 3]
        mask = free_atom_mask(batch, self.free_only)  # [N]
        maskf = mask.double()
        cos = torch.nn.functional.cosine_similarity(pred["forces"].double(), f_true, dim=-1, eps=1e-12)
        # max force error per structure over free atoms; fixed atoms contribute 0
        per_atom_max = f_err.amax(dim=-1) * maskf  # [N]
        struct_max = torch.zeros_like(e_err).scatter_reduce(0, batch.batch, per_atom_max, "amax")  # [B]
        hits = (e_err < ENERGY_THRESHOLD) & (struct_max < FORCE_THRESHOLD)
        baseline = e_err.new_full((), self.energy_mean)
        if self.references is not None:
            baseline = baseline + structure_references(self.references, batch.atomic_numbers, batch.batch,
                                                       batch.num_graphs)
        if "stress" in pred and batch.stress is not None:  # MAE over the 9 components
            stress_abs = (pred["stress"].double() - batch.stress.double()).abs().sum()
            n_stress = e_err.new_full((), 9.0 * batch.num_graphs)
        else:
            stress_abs = n_stress = e_err.new_zeros(())
        vals = torch.stack([
            e_err.sum(), e_err.new_full((), batch.num_graphs),  # filled on the device, no host copy
            (f_err.sum(-1) * maskf).sum(), 3.0 * maskf.sum(),
            (cos * maskf).sum(), maskf.sum(),
            hits.double().sum(),
            batch.energy.double().abs().sum(),  # the zero-prediction baselines, for reference
            (f_true.abs().sum(-1) * maskf).sum(),
            (batch.energy.double() - baseline).abs().sum(),
            stress_abs, n_stress,
        ])
        self.sums += vals

    def compute(self) -> dict[str, float]:
        """All-reduce the sums (collective: every rank must call it) and return the metrics."""
        s = dict(zip(_KEYS, all_reduce_sum(self.sums.clone()).tolist()))
        n_struct, n_comp, n_free = max(s["n_struct"], 1), max(s["n_force_comp"], 1), max(s["n_free"], 1)
        stress = {"stress_mae": s["stress_abs"] / s["n_stress"]} if s["n_stress"] > 0 else {}
        return {
            **stress,
            "energy_mae": s["energy_abs"] / n_struct,
            "forces_mae": s["force_abs"] / n_comp,
            "forces_cos": s["force_cos"] / n_free,
            "energy_forces_within_threshold": s["ewt_hits"] / n_struct,
            "energy_mae_mean_baseline": s["energy_mean_abs"] / n_struct,
            "energy_mae_zero_baseline": s["energy_zero_abs"] / n_struct,
            "forces_mae_zero_baseline": s["force_zero_abs"] / n_comp,
            "num_structures": s["n_struct"],
        }
