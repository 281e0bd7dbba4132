"""slurm/eval.sh: the prediction job array writes, per input file, what `python -m eqv2.predict` writes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.slurm.conftest import REPO, submit

pytestmark = pytest.mark.slurm


@pytest.fixture
def model_file(tmp_path) -> Path:
    """A model checkpoint of the tiny test architecture (weights as initialised: identity of the
    predictions, not their quality, is under test)."""
    from eqv2.checkpoint import Normalizers, save_model
    from eqv2.config import from_dict
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    import torch

    cfg = from_dict(ModelConfig, yaml.safe_load((REPO / "tests/slurm/tiny_run.yaml").read_text())["model"])
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, EquiformerV2(cfg), cfg, Normalizers(energy_mean=-1.0, energy_std=2.0, forces_std=0.5))
    return path


def test_eval_array_matches_serial_predict(slurm_cluster, demo_raw, model_file, tmp_path, jobs):
    inputs = demo_raw / "raw" / "train"
    files = sorted(p.name for p in inputs.glob("*.extxyz*"))
    assert len(files) >= 2, f"demo train split has {files}; the array test needs two files"
    out = tmp_path / "pred"
    # two array tasks for all files: task i takes files i, i+2, ...
    job = submit("slurm/eval.sh", tmp_path, ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=5"],
                 {"DEVICE": "cpu"}, script_args=(str(model_file), str(inputs), str(out)))
    jobs.append(job)
    job.wait(timeout=180)
    logs = job.logs()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f}.npz" for f in files), f"outputs differ\n{logs}"

    for name in files[:2]:
        serial = tmp_path / f"serial-{name}.npz"
        # One thread, as in the array task (--cpus-per-task=1): float sums then add in the same order.
        subprocess.run([sys.executable, "-m", "eqv2.predict", "--checkpoint", str(model_file), "--input",
                        str(inputs / name), "--output", str(serial), "--device", "cpu"],
                       check=True, cwd=REPO, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        got, want = np.load(out / f"{name}.npz"), np.load(serial)
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")

    # A rerun (what a requeue does) skips the finished files instead of redoing them.
    again = submit("slurm/eval.sh", tmp_path, ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=5"],
                   {"DEVICE": "cpu"}, script_args=(str(model_file), str(inputs), str(out)))
    jobs.append(again)
    again.wait(timeout=120)
    assert again.logs().count(".npz exists, skipped") >= len(files), again.logs()
