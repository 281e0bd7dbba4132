"""One helper for every equivariance test: random rotations, errors in float64 (e3nn-style)."""
from __future__ import annotations

import numpy as np
import torch

from eqv2.batch import AtomsBatch


def random_rotations(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 3] proper rotations, uniform on SO(3) (QR of Gaussian matrices, sign-fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    det = torch.linalg.det(q)
    q[det < 0, :, 0] *= -1
    return q


def batch_from_atoms(atoms_list, dtype=torch.float64) -> AtomsBatch:
    b = AtomsBatch.from_arrays(
        [dict(positions=a.positions, numbers=a.numbers, cell=np.array(a.cell), pbc=a.pbc) for a in atoms_list],
        ids=[f"s{i}" for i in range(len(atoms_list))],
        float_dtype=dtype,
    )
    return b


def rotate_batch(batch: AtomsBatch, rot: torch.Tensor) -> AtomsBatch:
    """Rotate positions and cells by rot (column-vector convention: r' = R r)."""
    from dataclasses import replace

    return replace(batch, pos=batch.pos @ rot.T.to(batch.pos.dtype), cell=batch.cell @ rot.T.to(batch.cell.dtype))


def max_equivariance_error(model, batch: AtomsBatch, rotations: torch.Tensor) -> dict[str, float]:
    """Largest |E(Rx) - E(x)| and |F(Rx) - R F(x)| over rotations, relative to the output scale."""
    with torch.no_grad():
        ref = model(batch)
        e_scale = ref["energy"].abs().max().clamp_min(1e-12)
        f_scale = ref["forces"].abs().max().clamp_min(1e-12) if "forces" in ref else None
        err_e, err_f = 0.0, 0.0
        for rot in rotations:
            out = model(rotate_batch(batch, rot))
            err_e = max(err_e, float((out["energy"] - ref["energy"]).abs().max() / e_scale))
            if f_scale is not None:
                expected = ref["forces"] @ rot.T.to(ref["forces"].dtype)
                err_f = max(err_f, float((out["forces"] - expected).abs().max() / f_scale))
    return {"energy": err_e, "forces": err_f}
