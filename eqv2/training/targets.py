"""What the trainer fits: the energy target (as stored, or minus fitted per-element references), the
normalisers, and the rules that gradient forces and the stress loss impose on a run config.

`data.energy_target`:
- `as_stored` (default): the samples' `energy` (OC20's referenced energies, or the total energies of an
  ASE dataset), normalised by the stats' energy mean and std;
- `fitted_references`: E - sum over the atoms of ref[Z], the references fitted by least squares on the
  training set (stats.json `energy_references`, eqv2/data/stats.py), normalised by the residuals' mean
  and std.  The references are stored in the run's checkpoints and exported with the model, which adds
  them back: predictions, the ASE calculator and evaluations are total energies.
A fine-tuning run from a model with references keeps them (`init.energy_references: keep`, so that it
predicts what the pretrained model does before its first step) or fits them on its own data (`refit`;
also when the pretrained model has none): then the energy mean is the new residuals', the scales stay
the pretrained model's.  A gradient-force model has forces_std = energy_std (its forces are derivatives
of the normalised energy, as fairchem's configs set grad_target_std = target_std).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqv2.batch import AtomsBatch
from eqv2.config import ConfigError
from eqv2.normalizers import Normalizers, structure_references


@dataclass
class Targets:
    normalizers: Normalizers
    references: list[float] | None  # eV by atomic number (the model's element table), or None
    energy_target: str  # data.energy_target of the run

    def reference_tensor(self, device: torch.device) -> torch.Tensor | None:
        return None if self.references is None else torch.tensor(self.references, dtype=torch.float64, device=device)


def physical(out: dict[str, torch.Tensor], batch: AtomsBatch, normalizers: Normalizers,
             references: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Model outputs in eV, eV/Å (and eV/Å^3), with the energy references added back: what the exported
    model (`eqv2.checkpoint.Potential`) predicts."""
    result = normalizers.denormalise(out)
    if references is not None:
        refs = structure_references(references, batch.atomic_numbers, batch.batch, batch.num_graphs)
        result["energy"] = result["energy"] + refs.to(result["energy"].dtype)
    return result


def reference_table(references: dict[int, float], size: int, where: str) -> list[float]:
    """The references by atomic number as a list over the model's element table (0 for absent elements)."""
    beyond = sorted(z for z in references if z >= size)
    if beyond:
        raise ConfigError(f"{where}: elements {beyond} are beyond the model's element table "
                          f"(model.max_num_elements={size})")
    return [float(references.get(z, 0.0)) for z in range(size)]


def resolve_targets(cfg, stats, stats_path: str, pretrained, resume_state: dict | None) -> Targets:
    """The run's normalisers and references: a resumed run keeps its own; a fine-tuning run its pretrained
    model's (references as init.energy_references says); a fresh run's come from the data stats.  A
    normalizers: section of the run config replaces the normalisers (never on resume)."""
    target = cfg.data.energy_target
    size = cfg.model.max_num_elements
    if resume_state is not None:
        normalizers = Normalizers.from_mapping(resume_state["normalizers"])
        return Targets(normalizers, resume_state.get("energy_references"), resume_state.get("energy_target", target))
    fitted = None
    if target == "fitted_references":
        if stats.energy_references is None:
            raise ConfigError(f"data.energy_target=fitted_references: {stats_path} has no energy_references "
                              f"(written before they were fitted); recompute it with eqv2 stats "
                              f"{cfg.data.train_manifest} --out {stats_path}")
        fitted = reference_table(stats.energy_references, size, stats_path)
    if pretrained is not None:
        normalizers = cfg.normalizers or Normalizers.from_mapping(pretrained.normalizers)
        if pretrained.energy_references is not None and target != "fitted_references":
            raise ConfigError(f"init.from_checkpoint {pretrained.source}: the model adds per-element energy "
                              "references; set data.energy_target: fitted_references (with init.energy_references: "
                              "keep or refit)")
        if pretrained.energy_references is not None and cfg.init.energy_references == "keep":
            references = list(pretrained.energy_references)
        else:  # references fitted on this data: the residuals' mean from it, the scales the weights' own
            references = fitted
            if fitted is not None and cfg.normalizers is None:
                normalizers = Normalizers(stats.referenced_energy_mean, normalizers.energy_std, normalizers.forces_std)
    elif fitted is not None:
        normalizers = cfg.normalizers or Normalizers(stats.referenced_energy_mean, stats.referenced_energy_std,
                                                     stats.forces_std)
        references = fitted
    else:
        normalizers = cfg.normalizers or Normalizers(stats.energy_mean, stats.energy_std, stats.forces_std)
        references = None
    if cfg.model.forces == "gradient" and normalizers.forces_std != normalizers.energy_std:
        # the forces are derivatives of the normalised energy: one scale for both (fairchem's
        # grad_target_std = target_std)
        if cfg.normalizers is not None:
            raise ConfigError(f"normalizers.forces_std={normalizers.forces_std} must equal normalizers.energy_std="
                              f"{normalizers.energy_std} with model.forces: gradient (forces are -dE/dx of the "
                              "normalised energy); leave normalizers: out or set them equal")
        normalizers = Normalizers(normalizers.energy_mean, normalizers.energy_std, normalizers.energy_std)
    return Targets(normalizers, references, target)


def check_zero_stage(cfg, zero_stage: int) -> None:
    """ZeRO-3 keeps each weight gathered only inside its module's forward and backward hooks.  The force
    pass (autograd.grad with create_graph, inside the forward) records second-order nodes that save the
    gathered weights (DeepSpeed's ZeRO-3 linear backward multiplies by the weight, layer norm's double
    backward keeps its weight); ZeRO-3 then re-partitions them to empty tensors, and the second backward
    reads those: "mat2 must be a matrix" (tests/train/test_gradient_forces_zero.py, docs/finetuning.md)."""
    if cfg.model.forces == "gradient" and zero_stage == 3:
        raise ConfigError("model.forces: gradient is not supported with ZeRO stage 3: ZeRO-3 re-partitions to empty "
                          "tensors the weights that the force loss's double backward saved, and its second backward "
                          "fails on them; use ZeRO stage 2 (ds_configs/zero2_bf16.json), which shards the optimizer "
                          "state and gradients")


def check_force_options(cfg) -> None:
    """Run-config combinations that cannot work with gradient forces or the stress loss (RunConfig)."""
    gradient = cfg.model.forces == "gradient"
    if cfg.loss.stress_coef > 0 and not gradient:
        raise ConfigError(f"loss.stress_coef={cfg.loss.stress_coef} needs model.forces: gradient (a direct-force "
                          "model predicts no stress)")
    if gradient and cfg.compile.enabled:
        raise ConfigError("compile.enabled=true is not supported with model.forces: gradient (torch.compile "
                          "cannot differentiate the compiled force computation again); set compile.enabled "
                          "to null or false")
