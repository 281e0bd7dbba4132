"""`eqv2 relax --precision`: the model runs eqv2.inference's path, its first batch checked against float32."""
from __future__ import annotations

import json

import torch

from eqv2.checkpoint import Normalizers, save_model
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.relax import main

CFG = ModelConfig(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, attn_alpha_channels=4,
                  attn_value_channels=2, ffn_hidden_channels=8, edge_channels=8, num_heads=2, max_radius=5.0,
                  max_neighbors=12)


def test_relax_bf16_is_checked_and_a_tight_tolerance_refuses(set_file, tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_model(model, EquiformerV2(CFG), CFG, Normalizers(energy_mean=0.0, energy_std=1.0, forces_std=0.1))
    args = ["--checkpoint", str(model), "--input", str(set_file), "--steps", "2", "--device", "cpu",
            "--precision", "bf16", "--compile", "off", "--limit", "3"]
    assert main([*args, "--output", str(tmp_path / "bf16")]) == 0
    err = capsys.readouterr().err
    assert "inference: bf16, eager" in err and "precision check (bf16 vs fp32, 3 structures)" in err
    assert "within the tolerance" in err
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["num_structures"] == 3
    assert main([*args, "--output", str(tmp_path / "tight"), "--precision-tolerance", "1e-12", "1e-12"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("eqv2 relax: precision check") and "OUTSIDE" in last and "--precision fp32" in last
