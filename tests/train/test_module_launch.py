"""`deepspeed --module eqv2.train`: the trainer launched as the installed package's module, from a
directory that is not the repository (as after `pip install`), trains and finishes (1 CPU rank)."""
from __future__ import annotations

import subprocess

from tests.train.conftest import common_args, free_port, launcher_env


def test_deepspeed_module_launch_trains(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    args = [*common_args(demo_data, run_dir), "--set", "optim.max_steps=2"]  # the last --set wins
    env = launcher_env()  # the package importable from PYTHONPATH, as installed
    proc = subprocess.run(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "--module", "eqv2.train",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "eqv2.train: finished at step 2" in out, out[-4000:]
    assert (run_dir / "checkpoints" / "latest").is_file()
