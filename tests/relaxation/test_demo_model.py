"""A small EquiformerV2 trained here on EMT relaxation trajectories (S2EF-style frames of the set's systems)
relaxes the set through `eqv2 relax --checkpoint` and beats the initial-structure baselines of IS2RE and IS2RS.
(The model sees the systems it relaxes: a demonstration that the trained model, the checkpoint, the
de-normalised energies and the relaxer work together, not a generalisation claim.)"""
from __future__ import annotations

import json

import numpy as np
import torch
import yaml
from ase.calculators.emt import EMT
from ase.optimize import LBFGS

from eqv2.batch import AtomsBatch
from eqv2.checkpoint import Potential, save_model
from eqv2.config import from_dict
from eqv2.data.ase_source import fixed_atoms
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.normalizers import Normalizers
from eqv2.relax import main as relax_main
from tests.relaxation.emt_set import ase_relax, initial_atoms, structure_of, write_is2r_extxyz
from tests.relaxation.test_relax_cli import REPO


def _trajectory_frames(count: int) -> list[dict]:
    """Every second frame of ASE's EMT relaxation of each system, with EMT energies and forces."""
    frames = []
    for i in range(count):
        atoms = initial_atoms(i)
        atoms.calc = EMT()
        opt = LBFGS(atoms, maxstep=0.04, memory=50, damping=1.0, alpha=70.0, logfile=None)

        def grab(a=atoms):
            frames.append(dict(positions=a.get_positions(), numbers=a.numbers, cell=np.array(a.cell), pbc=a.pbc,
                               tags=a.get_tags(), fixed=fixed_atoms(a), energy=a.get_potential_energy(), forces=a.get_forces()))
        opt.attach(grab, interval=2)
        opt.run(fmax=0.02, steps=300)
    return frames


def _train(frames: list[dict], steps: int) -> Potential:
    torch.manual_seed(0)
    e = np.array([f["energy"] for f in frames])
    f_all = np.concatenate([f["forces"] for f in frames])
    norm = Normalizers(energy_mean=float(e.mean()), energy_std=float(e.std()), forces_std=float(np.sqrt((f_all**2).mean())))
    raw = yaml.safe_load((REPO / "tests/slurm/tiny_run.yaml").read_text())["model"]
    raw.update(num_layers=2, sphere_channels=16, ffn_hidden_channels=16, attn_hidden_channels=16, edge_channels=16)
    cfg = from_dict(ModelConfig, raw)
    potential = Potential(EquiformerV2(cfg), norm)
    opt = torch.optim.Adam(potential.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    potential.train()
    for _ in range(steps):
        batch = AtomsBatch.from_arrays([frames[i] for i in rng.choice(len(frames), 8, replace=False)])
        out = potential(batch)
        e_loss = ((out["energy"] - batch.energy) / norm.energy_std).abs().mean()
        f_loss = ((out["forces"] - batch.forces) / norm.forces_std).norm(dim=-1)[~batch.fixed].mean()
        opt.zero_grad()
        (e_loss + 5 * f_loss).backward()
        opt.step()
    return potential.eval()


def test_trained_model_beats_initial_baselines(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        potential = _train(_trajectory_frames(6), steps=300)
    finally:
        torch.set_num_threads(threads)
    model = tmp_path / "model.pt"
    save_model(model, potential.model, potential.config, potential.normalizers)
    data = tmp_path / "set.extxyz"
    write_is2r_extxyz(data, [structure_of(a, target=ase_relax(a, 0.02, 300)[0]) for a in map(initial_atoms, range(6))])
    out = tmp_path / "relax"
    assert relax_main(["--checkpoint", str(model), "--input", str(data), "--output", str(out), "--fmax", "0.05",
                       "--steps", "100", "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    re, rs = m["is2re"], m["is2rs"]
    assert re["energy_mae"] < 0.3 * re["energy_mae_initial_baseline"], re
    assert rs["average_distance_within_threshold"] > rs["average_distance_within_threshold_initial_baseline"] + 0.05, rs
