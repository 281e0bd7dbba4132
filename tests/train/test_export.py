"""`eqv2 export`: a training checkpoint becomes a plain model that predicts what the trainer measured."""

import pytest

import eqv2
from tests.train.conftest import DEMO_STEPS, MAX_STEPS, demo_val_metrics, records
from tests.verbs import run_eqv2


def export(args):
    return run_eqv2("export", *args, check=True).stdout


def test_exported_ema_model_reproduces_the_trainers_validation(demo_run, demo_data, tmp_path):
    out = tmp_path / "demo.pt"
    export([str(demo_run / "checkpoints"), "-o", str(out)])
    model = eqv2.load_model(out)
    assert model.meta["weights"] == "ema" and model.meta["step"] == DEMO_STEPS
    got = demo_val_metrics(model, demo_data, batch_size=8)
    _, evals = records(demo_run)
    final = evals[-1]
    assert got["num_structures"] == final["num_structures"]
    assert got["forces_mae"] == pytest.approx(final["forces_mae"], rel=1e-4)
    assert got["energy_mae"] == pytest.approx(final["energy_mae"], rel=1e-4)


def test_export_from_zero2_checkpoint_live_and_best(reference_run, demo_run, tmp_path):
    live = tmp_path / "live.pt"
    export([str(reference_run / "checkpoints"), "--weights", "live", "-o", str(live)])
    model = eqv2.load_model(live)
    assert model.meta["step"] == MAX_STEPS and model.meta["weights"] == "live"
    best = tmp_path / "best.pt"
    stdout = export([str(demo_run / "checkpoints"), "--best", "-o", str(best)])
    assert "step_" in stdout and eqv2.load_model(best).meta["weights"] == "ema"
