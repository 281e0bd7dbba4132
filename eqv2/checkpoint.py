"""Plain eqv2 model checkpoints: what `eqv2.load_model`, the ASE calculator and `eqv2.predict` read.

A model checkpoint is a `torch.save`d dict (tensors and plain Python values only, so it loads with
`weights_only=True`):
    format: "eqv2-model", version: 1, or 2 when it has energy references
    model_config: mapping of `ModelConfig` fields
    state_dict: the EquiformerV2 weights (for trained runs: the EMA weights)
    normalizers: {energy_mean, energy_std, forces_std} — the model predicts
        (E - energy_mean - E_ref) / energy_std and F / forces_std; with a direct stress head (converted
        OMat24-family models, model_config.stress_head) also `stress`, its normalisers.  No version bump
        for them: an eqv2 without stress heads refuses such a file (unknown model_config / normalizers keys)
    energy_references (version 2 only): per-element energies in eV, indexed by atomic number; a
        structure's E_ref is the sum over its atoms (converted fairchem models trained on referenced
        energies, e.g. OC22's).  Version 1 files have none; a file with them is version 2 so that an
        eqv2 too old to add them refuses it instead of predicting energies without them.
    meta: free-form provenance (source checkpoint, step, energy target convention, ...)
Training checkpoints (DeepSpeed) are different; `eqv2 export` turns one into this format,
and `eqv2 convert` turns a fairchem/OCP checkpoint into it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqv2.batch import AtomsBatch
from eqv2.config import from_dict, to_dict
from eqv2.execution import apply_plan, choose_plan, paper_config
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.normalizers import Normalizers, renamed_legacy, structure_references

__all__ = ["Normalizers", "Potential", "load_model", "read_model_file", "save_model"]

FORMAT = "eqv2-model"
VERSION = 2  # the newest this eqv2 reads and writes
READABLE_VERSIONS = (1, 2)


class Potential(nn.Module):
    """An EquiformerV2 with its target normalisers and, if it has them, per-element energy references
    (eV, indexed by atomic number, added to each structure's energy): forward returns eV and eV/Å, and
    for gradient-force models or with a direct stress head the stress [B, 3, 3] in eV/Å^3 (ASE's sign convention)."""

    def __init__(self, model: EquiformerV2, normalizers: Normalizers, meta: dict[str, Any] | None = None,
                 energy_references: list[float] | None = None):
        super().__init__()
        self.model = model
        self.normalizers = normalizers
        self.meta = dict(meta or {})
        refs = None if energy_references is None else torch.tensor(energy_references, dtype=torch.float64)
        self.register_buffer("energy_references", refs)  # [max_num_elements] or None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        out = self.normalizers.denormalise(self.model(batch))
        if self.energy_references is not None:  # as fairchem: after denormalisation, summed per structure
            refs = structure_references(self.energy_references, batch.atomic_numbers, batch.batch, batch.num_graphs)
            out["energy"] = out["energy"] + refs.to(out["energy"].dtype)
        return out


def save_model(
    path: str | os.PathLike,
    model: EquiformerV2,
    model_cfg: ModelConfig,
    normalizers: Normalizers,
    meta: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    energy_references: list[float] | None = None,
) -> None:
    """Write a model checkpoint atomically (temporary file, then rename); version 1 unless it has
    energy references (one per entry of the model's element table)."""
    weights = state_dict if state_dict is not None else model.state_dict()
    payload = {
        "format": FORMAT,
        "version": 1 if energy_references is None else 2,
        "model_config": paper_config(to_dict(model_cfg)),  # the function only: the loading run picks its plan
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in weights.items()},
        "normalizers": to_dict(normalizers),
        "meta": dict(meta or {}),
    }
    if energy_references is not None:
        if len(energy_references) != model_cfg.max_num_elements:
            raise ValueError(f"{len(energy_references)} energy references for an element table of "
                             f"{model_cfg.max_num_elements} (max_num_elements)")
        payload["energy_references"] = [float(v) for v in energy_references]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Normalizers, dict,
                                                     list[float] | None]:
    """(model config mapping, state dict, normalisers, meta, energy references or None) of a model
    checkpoint, checked, for training from it (eqv2/training/finetune.py)."""
    payload = _read_payload(path)
    normalizers = from_dict(Normalizers, renamed_legacy(payload["normalizers"]), prefix="normalizers")
    return (payload["model_config"], payload["state_dict"], normalizers, payload.get("meta") or {},
            payload.get("energy_references"))


def _read_payload(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or not a torch file
        raise ValueError(f"{path}: not a readable eqv2 model checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (a DeepSpeed training checkpoint? export it with eqv2 export; a fairchem one? " \
               "convert it with eqv2 convert)"
        raise ValueError(f"{path}: not an eqv2 model checkpoint{hint}")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported eqv2 checkpoint version {payload.get('version')} (this eqv2 reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}; a newer eqv2 wrote it?)")
    if payload["version"] == 1 and "energy_references" in payload:
        raise ValueError(f"{path}: a version 1 model checkpoint cannot have energy_references")
    return payload


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """Load a model checkpoint into a `Potential` in eval mode on `device`."""
    payload = _read_payload(path)
    model_config, state_dict, meta = payload["model_config"], payload["state_dict"], payload.get("meta") or {}
    normalizers = from_dict(Normalizers, renamed_legacy(payload["normalizers"]), prefix="normalizers")
    # checkpoints written before the execution plan carry kernel and padding keys: dropped (they never changed
    # the function); inference runs in float32, where the plan is the reference modules without shape buckets
    cfg = from_dict(ModelConfig, paper_config(model_config), prefix="model_config")
    plan = choose_plan(device_type=torch.device(device).type, dtype="fp32", lmax=cfg.lmax, mmax=cfg.mmax,
                       forces=cfg.forces)
    references = payload.get("energy_references")
    if references is not None and len(references) != cfg.max_num_elements:
        raise ValueError(f"{path}: {len(references)} energy references for an element table of {cfg.max_num_elements}")
    model = apply_plan(EquiformerV2(cfg), plan)
    from eqv2.fairchem_compat import use_fairchem_numerics, wants_fairchem_numerics

    if wants_fairchem_numerics(meta):  # a converted fairchem checkpoint: its float32-built constants
        use_fairchem_numerics(model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return Potential(model, normalizers, meta, references).to(device).eval()
