"""Fine-tuning (`init:`): a run starts from a pretrained model's weights and normalisers, under every
ZeRO stage, with frozen parts, a scaled backbone learning rate or fresh heads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eqv2.train import main
from eqv2.training import checkpointing as ckpt
from eqv2.training.signals import EXIT_CONFIG
from tests.train.conftest import HERE, data_args, records, run_train
from tests.verbs import run_eqv2

RUN = str(HERE / "tiny_run.yaml")


def _args(demo_data: Path, run_dir: Path, steps: int, ds: str = "ds_zero2_cpu.json", *extra: str) -> list[str]:
    return ["--ds_config", str(HERE / ds), "--config", RUN, *data_args(demo_data), "--set", f"run_dir={run_dir}",
            "--set", f"optim.max_steps={steps}", "--set", "eval.max_batches=0", *extra]


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """An 8-step run (its final validation on the whole val split) and its EMA weights exported."""
    root = tmp_path_factory.mktemp("pretrained")
    run_dir, model = root / "run", root / "model.pt"
    rc, out = run_train(_args(demo_data, run_dir, 8))
    assert rc == [0], out
    run_eqv2("export", run_dir / "checkpoints", "-o", model, check=True)
    return run_dir, model


def _eval_at(run_dir: Path, step: int) -> dict:
    _, evals = records(run_dir)
    return next(e for e in evals if e["step"] == step and e["split"] == "val")


def _same_metrics(a: dict, b: dict) -> None:
    for key in ("energy_mae", "forces_mae"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


@pytest.mark.parametrize("source, ds, nproc", [("model", "ds_zero2_cpu.json", 1), ("run", "ds_zero3_cpu.json", 2)])
def test_init_keeps_the_pretrained_models_outputs_before_the_first_step(pretrained, demo_data, tmp_path, source, ds,
                                                                        nproc):
    run_dir, model = pretrained
    path = model if source == "model" else run_dir / "checkpoints"
    tuned = tmp_path / "tuned"
    rc, out = run_train(_args(demo_data, tuned, 2, ds, "--set", f"init.from_checkpoint={path}",
                              "--set", "eval.at_start=true"), nproc=nproc)
    assert rc == [0] * nproc, out
    assert "eqv2.train: initialised from" in out
    _same_metrics(_eval_at(tuned, 0), _eval_at(run_dir, 8))  # the source run's last validation, EMA weights
    train, _ = records(tuned)
    assert sorted(train) == [1, 2]  # a new optimizer, schedule and data stream: steps count from 1


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.run_weights(run_dir / "checkpoints" / ckpt.latest_tag(run_dir / "checkpoints"), "live")[1]


def test_backbone_lr_factor_zero_changes_only_the_fresh_heads(pretrained, demo_data, tmp_path):
    run_dir, model = pretrained
    source = torch.load(model, weights_only=True)["state_dict"]
    tuned = tmp_path / "tuned"
    rc, out = run_train(_args(demo_data, tuned, 3, "ds_zero2_cpu.json", "--set", f"init.from_checkpoint={model}",
                              "--set", "init.backbone_lr_factor=0.0", "--set", "init.reinit_heads=true"))
    assert rc == [0], out
    after = _weights(tuned)
    heads = [n for n in source if n.startswith(("energy_head.", "force_head."))]
    backbone = [n for n in source if n not in heads and n in after]
    assert heads and backbone
    for name in backbone:
        assert torch.equal(after[name], source[name]), name
    same = [n for n in heads if torch.equal(after[n], source[n])]
    assert not [n for n in same if n.endswith("weight") and source[n].dim() > 1], same  # every head matrix is new


def test_frozen_blocks_and_embeddings_stay_as_pretrained(pretrained, demo_data, tmp_path):
    run_dir, model = pretrained
    source = torch.load(model, weights_only=True)["state_dict"]
    tuned = tmp_path / "tuned"
    rc, out = run_train(_args(demo_data, tuned, 3, "ds_zero2_cpu.json", "--set", f"init.from_checkpoint={run_dir}/checkpoints",
                              "--set", "init.freeze_blocks=1", "--set", "init.freeze_embeddings=true"))
    assert rc == [0], out
    assert "M frozen)" in out
    after = _weights(tuned)
    frozen = [n for n in source if n.startswith(("blocks.0.", "atom_embedding.", "edge_degree_embedding."))]
    trained = [n for n in source if n.startswith("blocks.1.") and n.endswith("weight")]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(after[name], source[name]), name
    assert any(not torch.equal(after[n], source[n]) for n in trained)
    # a requeued fine-tuning run resumes its own checkpoint; the pretrained weights are not loaded again
    rc, out = run_train(_args(demo_data, tuned, 5, "ds_zero2_cpu.json", "--set", f"init.from_checkpoint={model}",
                              "--set", "init.freeze_blocks=1", "--set", "init.freeze_embeddings=true",
                              "--resume", "auto"))
    assert rc == [0], out
    assert "resumed from" in out and "initialised from" not in out
    assert sorted(records(tuned)[0]) == [1, 2, 3, 4, 5]
    for name in frozen:
        assert torch.equal(_weights(tuned)[name], source[name]), name


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.num_layers=3"], "model.num_layers=3 (the checkpoint has 2)"),
    (["--set", "init.freeze_blocks=5"], "init.freeze_blocks=5, but the model has 2 blocks"),
])
def test_init_config_mistakes_are_named(pretrained, demo_data, tmp_path, extra, message, capsys):
    # the trainer's main() in this process (a traceback would fail the test): the error comes before any
    # step, and a process launch would cost more than the check
    _, model = pretrained
    assert main(_args(demo_data, tmp_path / "tuned", 2, "ds_zero2_cpu.json",
                      "--set", f"init.from_checkpoint={model}", *extra)) == EXIT_CONFIG
    assert message in capsys.readouterr().err


def test_init_options_need_a_checkpoint(demo_data, tmp_path, capsys):
    assert main(_args(demo_data, tmp_path / "run", 2, "ds_zero2_cpu.json", "--set", "init.freeze_blocks=1")) \
        == EXIT_CONFIG
    assert "need init.from_checkpoint" in capsys.readouterr().err
    assert main(_args(demo_data, tmp_path / "run", 2, "ds_zero2_cpu.json",
                      "--set", f"init.from_checkpoint={tmp_path / 'nope.pt'}")) == EXIT_CONFIG
    assert f"init.from_checkpoint: not found: {tmp_path / 'nope.pt'}" in capsys.readouterr().err
