"""`eqv2 evaluate`: the trainer's validation metrics from a model file or a run checkpoint, exact over
ranks (torchrun, 2 CPU processes), several splits and their average, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eqv2.training import checkpointing as ckpt
from tests.train.conftest import REPO, free_port, records
from tests.verbs import run_eqv2


def _evaluate(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    # not the launcher variables an in-process trainer test may have left in this process's environment
    # (its process group still listens on that MASTER_PORT)
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    if nproc == 1:
        cmd = [sys.executable, "-m", "eqv2.evaluate"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "eqv2.evaluate"]
    return subprocess.run([*cmd, *args, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory) -> Path:
    from eqv2.tools.export import main as export

    out = tmp_path_factory.mktemp("evaluate") / "demo.pt"
    assert export([str(demo_run / "checkpoints"), "-o", str(out)]) == 0
    return out


def _results(path: Path) -> dict:
    return json.loads(path.read_text())["results"]


def test_the_trainers_last_validation_from_a_model_file_and_a_run_checkpoint(demo_run, demo_data, exported, tmp_path):
    val = f"val={demo_data / 'val' / 'manifest.json'}"
    proc = _evaluate("--checkpoint", str(exported), "--split", val, "--json", str(tmp_path / "a.json"))
    assert proc.returncode == 0, proc.stderr
    _, evals = records(demo_run)
    last = max(evals, key=lambda e: e["step"])
    got = _results(tmp_path / "a.json")["val"]
    assert got["num_structures"] == last["num_structures"] == 80
    for key in ("energy_mae", "forces_mae", "forces_cos"):
        assert got[key] == pytest.approx(last[key], rel=1e-5), key
    assert "| val |" in proc.stdout
    tag = demo_run / "checkpoints" / ckpt.latest_tag(demo_run / "checkpoints")
    proc = _evaluate("--checkpoint", str(tag), "--split", val, "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert _results(tmp_path / "b.json")["val"]["forces_mae"] == pytest.approx(got["forces_mae"], rel=1e-6)


def test_two_ranks_count_every_structure_once_and_agree(demo_data, exported, tmp_path):
    val = f"val={demo_data / 'val' / 'manifest.json'}"
    train = f"train={demo_data / 'train' / 'manifest.json'}"
    one = _evaluate("--checkpoint", str(exported), "--split", val, "--split", train, "--json", str(tmp_path / "1.json"))
    # two ranks with a loader process each (graphs built there): the same metrics
    two = _evaluate("--checkpoint", str(exported), "--split", val, "--split", train, "--json", str(tmp_path / "2.json"),
                    "--workers", "1", nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-3000:]
    r1, r2 = _results(tmp_path / "1.json"), _results(tmp_path / "2.json")
    assert r2["val"]["num_structures"] == 80 and r2["train"]["num_structures"] == 400
    for split in ("val", "train", "average"):
        for key in ("energy_mae", "forces_mae", "forces_cos", "energy_forces_within_threshold"):
            assert r2[split][key] == pytest.approx(r1[split][key], rel=1e-6, abs=1e-9), (split, key)
    assert r1["average"]["forces_mae"] == pytest.approx((r1["val"]["forces_mae"] + r1["train"]["forces_mae"]) / 2)
    assert r1["average"]["num_structures"] == 480


def test_limit_is_marked_partial(demo_data, exported, tmp_path):
    proc = _evaluate("--checkpoint", str(exported), "--split", f"val={demo_data / 'val' / 'manifest.json'}",
                     "--limit", "2", "--json", str(tmp_path / "l.json"))
    assert proc.returncode == 0, proc.stderr
    got = _results(tmp_path / "l.json")["val"]
    assert got["num_structures"] == 16 and got["complete"] is False and "(--limit)" in proc.stdout


def test_bf16_is_checked_against_fp32_and_close(demo_data, exported, tmp_path):
    """--precision bf16 (CPU autocast here; the fused kernels and compilation are CUDA's): the first batch is
    compared with float32 and reported, the JSON records it, and the trained demo model's metrics move little."""
    split = f"val={demo_data / 'val' / 'manifest.json'}"
    runs = {p: _evaluate("--checkpoint", str(exported), "--split", split, "--limit", "2", "--precision", p,
                         "--json", str(tmp_path / f"{p}.json")) for p in ("fp32", "bf16")}
    assert all(r.returncode == 0 for r in runs.values()), runs["bf16"].stderr
    assert "precision check (bf16 vs fp32" in runs["bf16"].stderr and "within the tolerance" in runs["bf16"].stderr
    low, ref = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("bf16", "fp32"))
    assert low["inference"].startswith("inference: bf16") and low["precision_checks"][0]["ok"]
    assert ref["precision_checks"] == [] and "fp32, eager" in ref["inference"]
    a, b = low["results"]["val"], ref["results"]["val"]
    assert a["energy_mae"] != b["energy_mae"]
    assert abs(a["energy_mae"] - b["energy_mae"]) < 0.05 * b["energy_mae"] + 1e-3
    assert abs(a["forces_mae"] - b["forces_mae"]) < 0.05 * b["forces_mae"] + 1e-3


@pytest.mark.parametrize("args, message", [
    (["--split", "val"], "--split 'val': expected NAME=MANIFEST"),
    (["--split", "val=/nope/manifest.json"], "--split val: manifest not found: /nope/manifest.json"),
])
def test_bad_arguments_are_one_line(exported, args, message):
    proc = _evaluate("--checkpoint", str(exported), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_checkpoint_is_named(tmp_path, demo_data):
    proc = _evaluate("--checkpoint", str(tmp_path / "none.pt"), "--split", f"val={demo_data / 'val' / 'manifest.json'}")
    assert proc.returncode == 2 and f"--checkpoint: not found: {tmp_path / 'none.pt'}" in proc.stderr


def _unlabelled_raw(raw: Path, seed: int) -> list[dict]:
    """OC20-layout raw files of a test split: positions, tags and fixed atoms, no energy, no forces."""
    from ase.data import chemical_symbols

    from tests.data.conftest import oc20_frames

    frames = oc20_frames(5, seed=seed, sid0=1000 * (seed + 1))
    raw.mkdir(parents=True)
    lines, ids = [], []
    for f in frames:
        cell = " ".join(f"{v:.8f}" for v in f["cell"].reshape(-1))
        lines += [str(len(f["numbers"])), f'Lattice="{cell}" Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1 '
                                           'pbc="T T T"']
        lines += [f"{chemical_symbols[int(z)]} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f} {'F' if fx else 'T'} {int(t)}"
                  for z, p, fx, t in zip(f["numbers"], f["positions"], f["fixed"], f["tags"])]
        ids.append(f"random{f['sid']},frame{f['fid']},\n")
    (raw / "data_000.extxyz").write_text("\n".join(lines) + "\n")
    (raw / "data_000.txt").write_text("".join(ids))
    return frames


def test_test_splits_give_fairchems_prediction_files_and_the_submission(exported, tmp_path):
    import ase
    import numpy as np

    from eqv2.calculator import EquiformerV2Calculator

    splits, frames = [], {}
    for seed, name in enumerate(("id", "ood_ads", "ood_cat", "ood_both")):
        raw = tmp_path / "raw" / name
        frames[name] = _unlabelled_raw(raw, seed)
        args = ["shard", raw, tmp_path / "shards" / name, "--shard-samples", "2", "--quiet"]
        refused = run_eqv2(*args)
        assert refused.returncode == 2 and "frame 0: no energy and no forces" in refused.stderr
        run_eqv2(*args, "--unlabelled", check=True)
        splits += ["--split", f"{name}={tmp_path / 'shards' / name / 'manifest.json'}"]
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"pred{nproc}"
        proc = _evaluate("--checkpoint", str(exported), *splits, "--predictions", str(out), "--prediction-dtype",
                         "float32", "--submission", str(out / "submission.npz"), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "no labels" in proc.stdout
        with np.load(out / "submission.npz") as sub:
            results[nproc] = {k: sub[k] for k in sub.files}
    sub = results[1]
    assert sorted(sub) == sorted(f"{s}_{k}" for s in ("id", "ood_ads", "ood_cat", "ood_both")
                                 for k in ("ids", "energy", "forces", "chunk_idx"))
    for key, value in sub.items():  # two ranks write the same file
        np.testing.assert_allclose(results[2][key], value, rtol=1e-5, atol=1e-5) if value.dtype.kind == "f" \
            else np.testing.assert_array_equal(results[2][key], value)
    calc = EquiformerV2Calculator(str(exported), device="cpu")
    for name, fs in frames.items():
        ids = [f"{f['sid']}_{f['fid']}" for f in fs]
        assert sub[f"{name}_ids"].tolist() == sorted(ids)
        forces = np.split(sub[f"{name}_forces"], sub[f"{name}_chunk_idx"])
        for f in fs:
            i = sub[f"{name}_ids"].tolist().index(f"{f['sid']}_{f['fid']}")
            atoms = ase.Atoms(numbers=f["numbers"], positions=f["positions"], cell=f["cell"], pbc=True)
            atoms.calc = calc
            assert sub[f"{name}_energy"][i] == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
            np.testing.assert_allclose(forces[i], atoms.get_forces()[~f["fixed"]], atol=1e-4)  # free atoms only
