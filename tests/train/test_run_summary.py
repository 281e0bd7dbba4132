"""The end-of-run summary: duration, checkpoints, best step, metrics file and the next commands."""
from __future__ import annotations

from tests.train.conftest import HERE, data_args, run_train


def test_a_finished_run_ends_with_a_summary(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", str(HERE / "ds_zero2_cpu.json"), "--config", str(HERE / "tiny_run.yaml"),
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=2"])
    assert rc == [0], out
    summary = out[out.index("eqv2.train: finished at step 2 after 0:"):]
    assert f"checkpoints: {run_dir / 'checkpoints'} (latest step_00000002)" in summary
    assert "best validation: step_00000002 (forces_mae " in summary
    assert f"next: eqv2 export {run_dir / 'checkpoints'} -o model.pt [--best]; eqv2 plot {run_dir}" in summary
