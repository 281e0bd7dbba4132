"""GPU check (run through the device tool) of the trainer on its default GPU path: compiled blocks
replayed as CUDA graphs over shape buckets, evaluation with the EMA weights swapped in.

CUDA graphs read parameters at fixed addresses and overwrite their outputs at the next replay, so an
evaluation that saw the live weights, stale weights or overwritten outputs would measure something
else than the exported EMA model evaluated eagerly; the two must agree to bf16 round-off."""
from __future__ import annotations

import pytest
import torch

import eqv2
from tests.train.conftest import data_args, demo_val_metrics, records, run_train
from tests.train.test_export import export

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_trainer_on_cuda_graphs_evaluates_its_ema_weights(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", "ds_configs/zero0_bf16.json", "--config", "configs/train/demo.yaml",
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=60",
                         "--set", "eval.every_steps=30", "--set", "log.every_steps=10",
                         "--set", "compile.mode=reduce-overhead", "--set", "execution.pad_atoms_multiple=32",
                         "--set", "execution.pad_edges_multiple=512"], timeout=900)
    assert rc == [0], out[-5000:]
    assert "on cuda/nccl" in out and "compiled:" in out, out[-3000:]
    train, evals = records(run_dir)
    assert [e["step"] for e in evals] == [30, 60] and all(torch.isfinite(torch.tensor(r["loss"])) for r in train.values())
    # torch's compile callbacks: the compilations happen, and are logged, in the first interval, and the
    # shape buckets are recorded as CUDA graphs (a shape's first run is an eager warm-up, so its
    # recording may fall in a later interval than the bucket's first batch)
    assert train[10]["compiles"] > 0 and train[10]["compile_s"] > 0, train[10]
    assert sum(r["cudagraph_records"] for r in train.values()) > 0, train

    exported = tmp_path / "demo.pt"
    export([str(run_dir / "checkpoints"), "-o", str(exported)])
    model = eqv2.load_model(exported).cuda()
    got = demo_val_metrics(model, demo_data, batch_size=4, device="cuda", bf16=True)
    final = evals[-1]
    assert got["num_structures"] == final["num_structures"]
    assert got["forces_mae"] == pytest.approx(final["forces_mae"], rel=2e-2)
    assert got["energy_mae"] == pytest.approx(final["energy_mae"], rel=5e-2)


def test_zero3_trainer_runs_on_cuda(demo_data, tmp_path):
    """ZeRO-3 builds the model partitioned and the engine leaves it where it is: the model's host-built
    constant tables (Wigner swap matrices, sphere grids) must still reach the GPU (session 10's 5.4B
    run failed with the swap matrices on the host)."""
    run_dir = tmp_path / "run"
    rc, out = run_train(["--ds_config", "ds_configs/zero3_bf16.json", "--config", "configs/train/demo.yaml",
                         *data_args(demo_data), "--set", f"run_dir={run_dir}", "--set", "optim.max_steps=6",
                         "--set", "eval.every_steps=6", "--set", "log.every_steps=2",
                         "--set", "activation_checkpointing.enabled=true"], timeout=600)
    assert rc == [0], out[-5000:]
    assert "ZeRO-3" in out and "on cuda/nccl" in out, out[-3000:]
    train, evals = records(run_dir)
    assert [e["step"] for e in evals] == [6] and all(torch.isfinite(torch.tensor(r["loss"])) for r in train.values())
