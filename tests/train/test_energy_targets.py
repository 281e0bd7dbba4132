"""Total energies with fitted per-element references (data.energy_target: fitted_references), end to end:
ASE frames with DFT-like total energies -> tools/shard_ase.py -> tools/dataset_stats.py (references
fitted) -> a real DeepSpeed run -> tools/export_model.py -> eqv2.predict, the ASE calculator and eqv2
evaluate all give total energies, consistent with the trainer's validation; fine-tuning keeps or refits
the references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from eqv2.train import main
from eqv2.training.signals import EXIT_CONFIG
from tests.train.conftest import HERE, REPO, records, run_train

# per-atom offsets that make EMT energies look like DFT totals (eV): hundreds of eV per structure
OFFSETS = {8: -4.9, 28: -5.6, 29: -3.7, 47: -2.8, 78: -6.1}
METALS = ("Cu", "Ni", "Pt", "Ag")


def frames(count: int, seed: int, metals=METALS) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        host, guest = rng.choice(metals, 2, replace=False)
        atoms = fcc111(str(host), (2, 2, 2), vacuum=5.0, a={"Cu": 3.6, "Ni": 3.52, "Pt": 3.92, "Ag": 4.09}[str(host)])
        symbols = atoms.get_chemical_symbols()
        for i in rng.choice(len(atoms), int(rng.integers(0, 4)), replace=False):
            symbols[i] = str(guest)
        atoms.set_chemical_symbols(symbols)
        if rng.random() < 0.5:
            add_adsorbate(atoms, "O", 1.6, "fcc")
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        energy = atoms.get_potential_energy() + sum(OFFSETS[int(z)] for z in atoms.numbers)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=atoms.get_forces())
        out.append(atoms)
    return out


def _tool(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _shard(path: Path, out: Path) -> Path:
    _tool(str(REPO / "tools" / "shard_ase.py"), str(path), str(out), "--shard-samples", "16", "--no-progress")
    # the tiny run's graph (6 Å / 12): avg_degree measured on it; the references are fitted here too
    _tool(str(REPO / "tools" / "dataset_stats.py"), str(out / "manifest.json"), "--max-radius", "6",
          "--max-neighbors", "12", "--degree-every", "1", "--out", str(out / "stats.json"), "--no-progress")
    return out / "manifest.json"


@pytest.fixture(scope="module")
def totals(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("totals")
    sets = {"train": frames(48, 0), "val": frames(12, 1), "other": frames(24, 2, ("Cu", "Pt"))}
    out = {}
    for name, atoms in sets.items():
        ase.io.write(root / f"{name}.extxyz", atoms)
        out[name] = _shard(root / f"{name}.extxyz", root / name)
    out["frames"], out["root"] = sets, root
    return out


def _args(totals: dict, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
            "--set", f"data.train_manifest={totals['train']}", "--set", f"data.val_manifest={totals['val']}",
            "--set", f"run_dir={run_dir}", "--set", f"optim.max_steps={steps}", "--set", "eval.max_batches=0",
            "--set", "loss.energy_coef=100.0", *extra]


@pytest.fixture(scope="module")
def trained(totals, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    run_dir, model = root / "run", root / "model.pt"
    rc, out = run_train(_args(totals, run_dir, 24, "--set", "data.energy_target=fitted_references"))
    assert rc == [0], out
    _tool(str(REPO / "tools" / "export_model.py"), str(run_dir / "checkpoints"), "-o", str(model))
    return run_dir, model


def test_stats_fit_references_near_the_offsets(totals):
    stats = json.loads((totals["train"].parent / "stats.json").read_text())
    refs = {int(z): v for z, v in stats["energy_references"].items()}
    assert set(refs) == set(OFFSETS)
    for z, offset in OFFSETS.items():  # EMT's own per-atom energies are within a few tenths of an eV
        assert abs(refs[z] - offset) < 1.0, (z, refs[z])
    assert stats["referenced_energy_std"] < 0.1 * stats["energy_std"]


def test_the_exported_model_predicts_total_energies(totals, trained, tmp_path):
    import eqv2
    from eqv2.calculator import EquiformerV2Calculator

    run_dir, model = trained
    saved = torch.load(model, weights_only=True)
    stats = json.loads((totals["train"].parent / "stats.json").read_text())
    assert saved["version"] == 2 and saved["meta"]["energy_target"] == "fitted_references"
    for z, ref in stats["energy_references"].items():
        assert saved["energy_references"][int(z)] == pytest.approx(ref)
    # eqv2 predict on the validation frames: total energies within a fraction of the residual spread
    val = totals["frames"]["val"]
    truth = np.array([a.get_potential_energy() for a in val])
    _tool("-m", "eqv2.predict", "--checkpoint", str(model), "--input", str(totals["root"] / "val.extxyz"),
          "--output", str(tmp_path / "pred.npz"), "--device", "cpu")
    pred = np.load(tmp_path / "pred.npz")["energy"]
    mae = np.abs(pred - truth).mean()
    assert mae < 0.1 * np.std(truth) and mae < 3 * stats["referenced_energy_std"], (mae, np.std(truth))
    # the ASE calculator: the same totals
    atoms = val[0].copy()
    atoms.calc = EquiformerV2Calculator(eqv2.load_model(model), threads=None)
    assert atoms.get_potential_energy() == pytest.approx(pred[0], abs=1e-4)
    # eqv2 evaluate, on the model file and on the run's checkpoint: the trainer's last validation
    _, evals = records(run_dir)
    last = [e for e in evals if e["split"] == "val"][-1]
    for source in (model, run_dir / "checkpoints"):
        _tool("-m", "eqv2.evaluate", "--checkpoint", str(source), "--split", f"val={totals['val']}",
              "--json", str(tmp_path / "eval.json"), "--no-progress")
        result = json.loads((tmp_path / "eval.json").read_text())["results"]["val"]
        assert result["energy_mae"] == pytest.approx(last["energy_mae"], rel=1e-5), source
        assert result["energy_mae"] == pytest.approx(mae, rel=1e-3), source
        assert result["energy_mae_mean_baseline"] == pytest.approx(last["energy_mae_mean_baseline"], rel=1e-6)
        assert result["energy_mae_mean_baseline"] < 0.1 * result["energy_mae_zero_baseline"]


def test_fine_tuning_keeps_or_refits_the_references(totals, trained, tmp_path):
    from eqv2.training import checkpointing as ckpt

    run_dir, model = trained
    source = torch.load(model, weights_only=True)["energy_references"]
    other = json.loads((totals["other"].parent / "stats.json").read_text())["energy_references"]
    for mode in ("keep", "refit"):
        tuned = tmp_path / mode
        rc, out = run_train(_args(totals, tuned, 2, "--set", f"init.from_checkpoint={model}",
                                  "--set", "data.energy_target=fitted_references",
                                  "--set", f"data.train_manifest={totals['other']}",
                                  "--set", f"init.energy_references={mode}", "--set", "eval.at_start=true"))
        assert rc == [0], out
        state = ckpt.read_state(tuned / "checkpoints" / ckpt.latest_tag(tuned / "checkpoints"))
        if mode == "keep":  # before its first step the run predicts what the exported model does
            assert state["energy_references"] == pytest.approx(source)
            _, evals = records(tuned)
            _, before = records(run_dir)
            at_start = next(e for e in evals if e["step"] == 0)
            assert at_start["energy_mae"] == pytest.approx([e for e in before if e["split"] == "val"][-1]["energy_mae"],
                                                           rel=1e-5)
        else:
            for z, ref in other.items():
                assert state["energy_references"][int(z)] == pytest.approx(ref)
            assert state["energy_references"][28] == 0.0  # Ni is not in the new data


def test_a_model_with_references_needs_the_fitted_target(totals, trained, tmp_path, capsys):
    # config errors: the trainer's main() in this process (a traceback would fail the test), cheaper than a launch
    _, model = trained
    assert main(_args(totals, tmp_path / "run", 1, "--set", f"init.from_checkpoint={model}")) == EXIT_CONFIG
    assert "set data.energy_target: fitted_references" in capsys.readouterr().err


def test_old_stats_without_references_are_named(totals, tmp_path, capsys):
    stats = json.loads((totals["train"].parent / "stats.json").read_text())
    for key in ("energy_references", "referenced_energy_mean", "referenced_energy_std"):
        stats.pop(key)
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert main(_args(totals, tmp_path / "run", 1, "--set", "data.energy_target=fitted_references",
                      "--set", f"data.stats={tmp_path / 'stats.json'}")) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "has no energy_references" in err and "eqv2 stats" in err, err
