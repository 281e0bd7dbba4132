"""S2EF metrics against a hand computation (numpy), including fixed atoms and EwT."""
import numpy as np
import pytest
import torch

from eqv2.batch import AtomsBatch
from eqv2.training.metrics import S2EFMetrics


def test_metrics_match_numpy_reference():
    rng = np.random.default_rng(1)
    sizes = [4, 6, 3]
    structs = [dict(positions=rng.normal(size=(n, 3)), numbers=np.ones(n, int), cell=np.eye(3),
                    pbc=np.zeros(3, bool), energy=rng.normal(), forces=rng.normal(size=(n, 3)),
                    fixed=np.arange(n) == 0) for n in sizes]
    batch = AtomsBatch.from_arrays(structs)
    pred_f = batch.forces + torch.as_tensor(rng.normal(scale=0.05, size=(13, 3)), dtype=torch.float32)
    pred_f[:4] = batch.forces[:4] + 0.001  # structure 0 within the force threshold ...
    pred_e = batch.energy + torch.tensor([0.01, 0.5, 0.01])  # ... and the energy one: an EwT hit
    pred_f[10:] = batch.forces[10:] + 0.001  # structure 2 forces within, energy within -> hit
    pred_f[10] += 5.0  # ... but atom 10 is fixed in structure 2: ignored
    metrics = S2EFMetrics(torch.device("cpu"), energy_mean=0.25)
    # update in two calls to check accumulation
    metrics.update({"energy": pred_e, "forces": pred_f}, batch)
    m = metrics.compute()

    free = ~batch.fixed.numpy()
    df = (pred_f - batch.forces).numpy()
    assert m["energy_mae"] == pytest.approx(np.abs((pred_e - batch.energy).numpy()).mean(), rel=1e-6)
    assert m["forces_mae"] == pytest.approx(np.abs(df[free]).mean(), rel=1e-6)
    pf, tf = pred_f.numpy()[free], batch.forces.numpy()[free]
    cos = (pf * tf).sum(-1) / np.linalg.norm(pf, axis=-1) / np.linalg.norm(tf, axis=-1)
    assert m["forces_cos"] == pytest.approx(cos.mean(), rel=1e-5)
    assert m["energy_forces_within_threshold"] == pytest.approx(2 / 3)
    assert m["forces_mae_zero_baseline"] == pytest.approx(np.abs(batch.forces.numpy()[free]).mean(), rel=1e-6)
    assert m["energy_mae_mean_baseline"] == pytest.approx(np.abs(batch.energy.numpy() - 0.25).mean(), rel=1e-6)
    assert m["num_structures"] == 3
