"""Training with gradient forces (model.forces: gradient) and a stress loss, under the `deepspeed`
launcher on 2 CPU ranks: the double backward runs under ZeRO, the stress term enters the loss and is
logged (metrics.jsonl, the console line, W&B, `eqv2 plot`), the validation reports a stress MAE and the
exported model gives the ASE calculator its stress; combinations that cannot work are refused naming the key."""
from __future__ import annotations

import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from tests.train.conftest import HERE, REPO, TRAIN, data_args, free_port, launcher_env, records, run_train

GRADIENT = ["--set", "model.forces=gradient"]


def crystals(count: int, seed: int) -> list:
    """Strained, rattled fcc crystals (8 atoms) with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        metal = str(rng.choice(["Cu", "Ni"]))
        atoms = bulk(metal, "fcc", a={"Cu": 3.6, "Ni": 3.52}[metal]) * (2, 2, 2)
        strain = np.eye(3) + 0.03 * rng.uniform(-1, 1, (3, 3))
        atoms.set_cell(np.array(atoms.cell) @ (strain + strain.T) / 2, scale_atoms=True)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        out.append(atoms)
    return out


def _tool(*args: str):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def stress_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stress")
    for name, seed, count in (("train", 0, 32), ("val", 1, 8)):
        ase.io.write(root / f"{name}.extxyz", crystals(count, seed))
        _tool(str(REPO / "tools" / "shard_ase.py"), str(root / f"{name}.extxyz"), str(root / name),
              "--shard-samples", "4", "--no-progress")
        _tool(str(REPO / "tools" / "dataset_stats.py"), str(root / name / "manifest.json"), "--max-radius", "6",
              "--max-neighbors", "12", "--degree-every", "1", "--out", str(root / name / "stats.json"), "--no-progress")
    return root


def _args(data: Path, run_dir: Path, steps: int, ds: str, *extra: str) -> list[str]:
    return ["--ds_config", str(HERE / ds), "--config", str(HERE / "tiny_run.yaml"), *data_args(data),
            "--set", f"run_dir={run_dir}", "--set", f"optim.max_steps={steps}", "--set", "eval.max_batches=0",
            "--set", "log.every_steps=1", *extra]


def _deepspeed(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args],
                          cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=600)


def test_gradient_forces_and_stress_train_under_the_deepspeed_launcher(stress_data, tmp_path):
    import eqv2
    from eqv2.calculator import EquiformerV2Calculator

    runs, console = {}, {}
    wandb = ["--set", "log.wandb.enabled=true", "--set", "log.wandb.mode=offline"] \
        if importlib.util.find_spec("wandb") else []
    for coef in ("0.0", "10.0"):
        run_dir = tmp_path / f"stress_{coef}"
        proc = _deepspeed(_args(stress_data, run_dir, 3, "ds_zero2_cpu.json", *GRADIENT,
                                "--set", f"loss.stress_coef={coef}", *(wandb if coef != "0.0" else [])))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[coef], console[coef] = records(run_dir), proc.stdout
    (plain, _), (stressed, evals) = runs["0.0"], runs["10.0"]
    # the logged terms follow the loss: a stress term only where loss.stress_coef > 0, and then the loss is
    # exactly the weighted sum of its logged terms (tiny_run.yaml: the default energy and force weights)
    assert all("stress_l2mae_norm" not in r for r in plain.values())
    for r in stressed.values():
        assert r["stress_l2mae_norm"] > 0
        assert r["loss"] == pytest.approx(4.0 * r["energy_mae_norm"] + 100.0 * r["force_l2mae_norm"]
                                          + 10.0 * r["stress_l2mae_norm"], rel=1e-6)
    assert re.search(r"step 1/3 ep 0 loss \S+ \(E \S+ F \S+ S \S+\)", console["10.0"]), console["10.0"][-3000:]
    assert re.search(r"step 1/3 ep 0 loss \S+ \(E \S+ F \S+\) lr", console["0.0"]), console["0.0"][-3000:]
    # step 1's loss is measured before any update: the stress term is the only difference
    assert stressed[1]["loss"] > plain[1]["loss"] * (1 + 1e-6), (stressed[1], plain[1])
    assert stressed[1]["force_l2mae_norm"] == pytest.approx(plain[1]["force_l2mae_norm"], rel=1e-5)
    assert all(np.isfinite(r["loss"]) for r in stressed.values()) and stressed[3]["nonfinite_steps"] == 0
    last = [e for e in evals if e["split"] == "val"][-1]
    assert last["stress_mae"] > 0 and np.isfinite(last["stress_mae"])
    if wandb:  # the W&B run holds the stress term and the stress MAE, as metrics.jsonl
        from tests.train.test_wandb_log import _history

        rows = {}
        for row in _history(next((tmp_path / "stress_10.0" / "wandb").glob("offline-run-*/run-*.wandb"))):
            rows.setdefault(row["_step"], {}).update(row)
        assert [rows[s]["train/stress_l2mae_norm"] for s in (1, 2, 3)] == \
            pytest.approx([stressed[s]["stress_l2mae_norm"] for s in (1, 2, 3)])
        assert rows[last["step"]]["val/val/stress_mae"] == pytest.approx(last["stress_mae"])
    if importlib.util.find_spec("matplotlib"):  # eqv2 plot draws the run, stress curves included
        from eqv2.plot import main as plot_main

        assert plot_main([str(tmp_path / "stress_10.0"), "--out", str(tmp_path / "plots")]) == 0
        # one 550-pixel panel per validation metric: energy, forces, cosine, EwT and stress MAE
        png = (tmp_path / "plots" / "validation.png").read_bytes()
        assert struct.unpack(">I", png[16:20])[0] == 5 * 550, struct.unpack(">I", png[16:20])
    # the exported model is a gradient model: the ASE calculator reports its stress
    model = tmp_path / "model.pt"
    _tool(str(REPO / "tools" / "export_model.py"), str(tmp_path / "stress_10.0" / "checkpoints"), "-o", str(model))
    atoms = ase.io.read(stress_data / "val.extxyz", index=0)
    atoms.calc = EquiformerV2Calculator(eqv2.load_model(model), threads=None)
    assert atoms.get_stress().shape == (6,) and np.isfinite(atoms.get_stress()).all()


def test_zero_stage_3_is_refused(stress_data, tmp_path):
    rc, out = run_train(_args(stress_data, tmp_path / "run", 1, "ds_zero3_cpu.json", *GRADIENT))
    assert rc == [2] and "model.forces: gradient is not supported with ZeRO stage 3: ZeRO-3 re-partitions" in out, out
    assert "use ZeRO stage 2 (ds_configs/zero2_bf16.json)" in out and "Traceback" not in out, out


def test_stress_loss_without_stress_in_the_data_names_the_key(demo_data, tmp_path):
    rc, out = run_train(_args(demo_data, tmp_path / "run", 1, "ds_zero2_cpu.json", *GRADIENT,
                              "--set", "loss.stress_coef=1.0"))
    assert rc == [2] and "loss.stress_coef=1.0: the training data has no stress" in out, out


@pytest.mark.parametrize("extra, message", [
    (["--set", "loss.stress_coef=1.0"], "loss.stress_coef=1.0 needs model.forces: gradient"),
    (GRADIENT + ["--set", "compile.enabled=true"], "compile.enabled=true is not supported with model.forces: gradient"),
    (GRADIENT + ["--set", "execution.fused_rotation=true"],
     "execution.fused_rotation: not supported with forces: gradient"),
    (["--set", "model.fused_rotation=true"], "model.fused_rotation: moved to execution.fused_rotation"),
    (GRADIENT + ["--set", "normalizers={energy_mean: 0.0, energy_std: 1.0, forces_std: 0.5}"],
     "normalizers.forces_std=0.5 must equal normalizers.energy_std=1.0"),
])
def test_combinations_that_cannot_work_are_refused(stress_data, tmp_path, extra, message):
    rc, out = run_train(_args(stress_data, tmp_path / "run", 1, "ds_zero2_cpu.json", *extra))
    assert rc == [2] and message in out, out
