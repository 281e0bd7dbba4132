"""Loss normalised by global counts: splitting a batch into micro-batches changes nothing."""
import numpy as np
import torch

from eqv2.batch import AtomsBatch
from eqv2.training.loss import EnergyForceLoss, LossConfig, Normalizers, global_counts


def _batch(seed, sizes):
    rng = np.random.default_rng(seed)
    structs = [dict(positions=rng.normal(size=(n, 3)), numbers=rng.integers(1, 9, n), cell=np.eye(3),
                    pbc=np.zeros(3, bool), energy=rng.normal(), forces=rng.normal(size=(n, 3)),
                    fixed=rng.random(n) < 0.3, tags=np.zeros(n, int)) for n in sizes]
    return AtomsBatch.from_arrays(structs)


def _pred(batch, w):
    # a differentiable "model": energies and forces depend on a shared weight vector w [4]
    energy = torch.zeros(batch.num_graphs).index_add(0, batch.batch, batch.pos @ w[:3]) + w[3]
    forces = batch.pos * w[:3]
    return {"energy": energy, "forces": forces}


def test_micro_batch_split_gives_same_loss_and_gradient():
    norm = Normalizers(energy_mean=0.3, energy_std=2.0, forces_std=1.5)
    fn = EnergyForceLoss(LossConfig(energy_coef=4.0, force_coef=100.0), norm)
    whole = _batch(0, [3, 5, 2, 7])
    sizes = [3, 5, 2, 7]
    w = torch.tensor([0.1, -0.2, 0.3, 0.05], requires_grad=True)
    counts = global_counts([whole], True, torch.device("cpu"))
    loss_whole, terms = fn(_pred(whole, w), whole, counts, scale=1.0)
    (g_whole,) = torch.autograd.grad(loss_whole, w)

    # reference by hand: energy MAE over structures, force L2-MAE over free atoms
    e_ref = ((_pred(whole, w)["energy"] - (whole.energy - 0.3) / 2.0).abs().mean())
    free = ~whole.fixed
    f_ref = torch.linalg.vector_norm(_pred(whole, w)["forces"] - whole.forces / 1.5, dim=-1)[free].mean()
    torch.testing.assert_close(loss_whole, 4.0 * e_ref + 100.0 * f_ref)

    # split into two micro-batches (what grad accumulation / two ranks see); DeepSpeed averages over the
    # 2 micro-batches, the scale 2 undoes it
    starts = np.cumsum([0] + sizes)
    micro = []
    for idx in ([0, 1], [2, 3]):
        sel = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx])
        micro.append(AtomsBatch(pos=whole.pos[sel], atomic_numbers=whole.atomic_numbers[sel],
                                cell=whole.cell[idx], pbc=whole.pbc[idx], natoms=whole.natoms[idx],
                                batch=torch.repeat_interleave(torch.arange(2), whole.natoms[idx]),
                                fixed=whole.fixed[sel], tags=whole.tags[sel], energy=whole.energy[idx],
                                forces=whole.forces[sel]))
    counts = global_counts(micro, True, torch.device("cpu"))
    torch.testing.assert_close(counts, global_counts([whole], True, torch.device("cpu")))
    total = 0
    for b in micro:
        loss, _ = fn(_pred(b, w), b, counts, scale=2.0)
        total = total + loss / 2.0
    (g_split,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(total, loss_whole)
    torch.testing.assert_close(g_split, g_whole)
