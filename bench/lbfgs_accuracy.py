#!/usr/bin/env python
"""How accurate the batched LBFGS step is: along EMT relaxations of six slabs with adsorbates, the raw step of
every structure (before the maxstep scaling) from the compact form (`BatchedLBFGS`) and from the float64
two-loop recursion (the reference kept in tests/relaxation/test_lbfgs_step.py), each against the two-loop
recursion in extended precision (numpy longdouble) on the same pairs. CPU, ASE's EMT.

    PYTHONPATH=. python3 -m bench.lbfgs_accuracy --memory 50 --steps 400 --fmin 1e-6

Structures leave once their largest force is below --fmin (as the engine retires converged ones).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import numpy as np
import torch
from ase.calculators.emt import EMT

from eqv2.relaxation.optimizers import BatchedLBFGS, LBFGSConfig, select
from tests.relaxation.emt_set import initial_atoms
from tests.relaxation.test_lbfgs_step import TwoLoopLBFGS

LONG = np.longdouble


def extended(s: np.ndarray, y: np.ndarray, rho: np.ndarray, order: list[int], g: np.ndarray, alpha: float) -> np.ndarray:
    """-H g of one structure by the two-loop recursion in long double; s, y [n, m, 3], pairs in `order`."""
    valid = [j for j in order if rho[j] != 0]
    S, Y = [s[:, j].astype(LONG).ravel() for j in valid], [y[:, j].astype(LONG).ravel() for j in valid]
    rhos = [LONG(1) / np.dot(a, b) for a, b in zip(S, Y)]
    q, alphas = g.astype(LONG).ravel(), []
    for a, b, r in reversed(list(zip(S, Y, rhos))):
        alphas.append(r * np.dot(a, q))
        q = q - alphas[-1] * b
    z = q / LONG(alpha)
    for (a, b, r), al in zip(zip(S, Y, rhos), reversed(alphas)):
        z = z + a * (al - r * np.dot(b, z))
    return -z.reshape(-1, 3)


def raw_step(opt, state, pos, forces, seg) -> torch.Tensor:
    """The step's displacement with no maxstep scaling, computed at positions shifted to 0 (no rounding of
    the displacement against the positions)."""
    opt, state = copy.deepcopy(opt), copy.deepcopy(state)
    opt.cfg = dataclasses.replace(opt.cfg, maxstep=1e30, damping=1.0)
    state[0]["r0"] = state[0]["r0"] - pos
    return opt.step(state, torch.zeros_like(pos), forces, seg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", type=int, default=50)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--fmin", type=float, default=1e-6)
    args = p.parse_args()
    torch.set_num_threads(1)
    atoms = [initial_atoms(i, layers=3 + i % 2, size=2 + (i % 3 == 0)) for i in range(6)]
    for a in atoms:
        a.calc = EMT()
    live = list(range(len(atoms)))
    seg_of = lambda: torch.repeat_interleave(torch.arange(len(live)), torch.tensor([len(atoms[j]) for j in live]))

    def forces(pos: torch.Tensor) -> torch.Tensor:
        out, lo = [], 0
        for j in live:
            atoms[j].set_positions(pos[lo:lo + len(atoms[j])].numpy())
            lo += len(atoms[j])
            out.append(atoms[j].get_forces() * (atoms[j].get_tags() != 0)[:, None])
        return torch.as_tensor(np.concatenate(out))

    cfg = LBFGSConfig(memory=args.memory)
    pos, seg = torch.as_tensor(np.concatenate([a.get_positions() for a in atoms])), seg_of()
    compact, twoloop = BatchedLBFGS(cfg), TwoLoopLBFGS(cfg)
    state, ref_state = compact.new_state(len(seg), len(live), pos), twoloop.new_state(len(seg), len(live))
    rows, negative, cond = [], 0, 0.0
    for k in range(args.steps):
        f = forces(pos)
        fmax = torch.zeros(len(live), dtype=torch.float64).scatter_reduce_(0, seg, f.norm(dim=-1), "amax")
        keep = fmax >= args.fmin
        if not keep.any():
            break
        if not keep.all():
            atom_index, struct_index = torch.nonzero(keep[seg]).squeeze(1), torch.nonzero(keep).squeeze(1)
            state, ref_state = select(state, atom_index, struct_index), select(ref_state, atom_index, struct_index)
            pos, f, fmax = pos[atom_index], f[atom_index], fmax[struct_index]
            live = [live[j] for j in struct_index.tolist()]
            seg = seg_of()
        slot = compact.slot
        mine, theirs = raw_step(compact, state, pos, f, seg), raw_step(twoloop, ref_state, pos, f, seg)
        new = compact.step(state, pos, f, seg)
        twoloop.step(ref_state, pos.clone(), f.clone(), seg)
        negative += int((ref_state[1]["rho"][:, slot] < 0).sum())
        order = [(slot + 1 + q) % cfg.memory for q in range(cfg.memory)]
        chrono = torch.tensor(order)
        r_mat = state[1]["sty"][:, chrono][:, :, chrono].triu() + torch.diag_embed((state[1]["rho"][:, chrono] == 0).double())
        cond = max(cond, float(torch.linalg.cond(r_mat).max()))
        for i in range(len(live)):
            at = seg == i
            ref = extended(state[0]["s"][at].numpy(), state[0]["y"][at].numpy(), state[1]["rho"][i].numpy(), order,
                           -f[at].numpy(), cfg.alpha)
            scale = np.linalg.norm(ref.astype(np.float64))
            err = [np.linalg.norm((d[at].numpy().astype(LONG) - ref).astype(np.float64)) / scale for d in (mine, theirs)]
            rows.append((k, live[i], float(fmax[i]), *err))
        pos = new
    r = np.array(rows)
    print(f"memory {args.memory}: {int(r[:, 0].max()) + 1} steps, {len(r)} structure steps, {negative} pairs with ys < 0, "
          f"largest cond(R) {cond:.1e}")
    for col, name in ((3, "compact form"), (4, "float64 two-loop")):
        j = int(r[:, col].argmax())
        print(f"{name}: relative error of the raw step vs long double, max {r[j, col]:.2e} (step {int(r[j, 0])}, "
              f"structure {int(r[j, 1])}, fmax {r[j, 2]:.2f}), median {np.median(r[:, col]):.1e}")


if __name__ == "__main__":
    main()
