"""Plain eqv2 model checkpoints: what `eqv2.load_model`, the ASE calculator and `eqv2.predict` read.

A model checkpoint is a `torch.save`d dict (tensors and plain Python values only, so it loads with
`weights_only=True`):
    format: "eqv2-model", version: 1
    model_config: mapping of `ModelConfig` fields
    state_dict: the EquiformerV2 weights (for trained runs: the EMA weights)
    normalizers: {energy_mean, energy_std, forces_std} — the model predicts
        (E - energy_mean) / energy_std and F / forces_std
    meta: free-form provenance (source checkpoint, step, energy target convention, ...)
Training checkpoints (DeepSpeed) are different; `tools/export_model.py` turns one into this format,
and `tools/convert_fairchem_checkpoint.py` turns a fairchem/OCP checkpoint into it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqv2.batch import AtomsBatch
from eqv2.config import from_dict, to_dict
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.normalizers import Normalizers, renamed_legacy

__all__ = ["Normalizers", "Potential", "load_model", "read_model_file", "save_model"]

FORMAT = "eqv2-model"
VERSION = 1


class Potential(nn.Module):
    """An EquiformerV2 with its target normalisers: forward returns eV and eV/Å."""

    def __init__(self, model: EquiformerV2, normalizers: Normalizers, meta: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.normalizers = normalizers
        self.meta = dict(meta or {})

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def forward(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        return self.normalizers.denormalise(self.model(batch))


def save_model(
    path: str | os.PathLike,
    model: EquiformerV2,
    model_cfg: ModelConfig,
    normalizers: Normalizers,
    meta: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a model checkpoint atomically (temporary file, then rename)."""
    weights = state_dict if state_dict is not None else model.state_dict()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": to_dict(model_cfg),
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in weights.items()},
        "normalizers": to_dict(normalizers),
        "meta": dict(meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Normalizers, dict]:
    """(model config mapping, state dict, normalisers, meta) of a model checkpoint, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or not a torch file
        raise ValueError(f"{path}: not a readable eqv2 model checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (a DeepSpeed training checkpoint? export it with tools/export_model.py; a fairchem one? " \
               "convert it with tools/convert_fairchem_checkpoint.py)"
        raise ValueError(f"{path}: not an eqv2 model checkpoint{hint}")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported eqv2 checkpoint version {payload.get('version')} (expected {VERSION})")
    normalizers = from_dict(Normalizers, renamed_legacy(payload["normalizers"]), prefix="normalizers")
    return payload["model_config"], payload["state_dict"], normalizers, payload.get("meta") or {}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """Load a model checkpoint into a `Potential` in eval mode on `device`."""
    model_config, state_dict, normalizers, meta = read_model_file(path)
    cfg = from_dict(ModelConfig, model_config, prefix="model_config")
    model = EquiformerV2(cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return Potential(model, normalizers, meta).to(device).eval()
