#!/usr/bin/env python
"""The cost of one batched LBFGS step (`BatchedLBFGS.step`) on its own: aten operations per step counted with
torch.profiler (CPU activities) and wall time per step (median), with every history slot filled.

    PYTHONPATH=. python3 -m bench.lbfgs_step --structures 8 --atoms 80 --memory 50 --repeat 200 --json out.json

The structures are Morse clusters of 76-84 atoms (a quarter of each held fixed) starting from a jittered
lattice, so that the pairs are those of a real relaxation (far from converged after the steps timed); the
forces are computed outside the timed region. The step runs --memory + 10 steps
first (every slot filled, the ring wrapped), then one profiled step, then --repeat timed ones.

Counts: `top_level` aten operations called from the step itself, `all` aten operations including nested ones,
and `kernel_like` the leaf aten operations that are not views or metadata (an estimate of kernel launches on a
GPU). On CPU the figures are CPU figures: the GPU cost is not measured here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eqv2.relaxation.optimizers import BatchedLBFGS, LBFGSConfig

NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::as_strided", "aten::select",
             "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::t", "aten::transpose",
             "aten::permute", "aten::alias", "aten::detach", "aten::_unsafe_view", "aten::resolve_conj",
             "aten::resolve_neg", "aten::result_type", "aten::diagonal", "aten::lift_fresh", "aten::empty_like",
             "aten::_reshape_alias", "aten::numpy_T", "aten::mT", "aten::unflatten", "aten::flatten", "aten::split",
             "aten::chunk", "aten::unbind", "aten::narrow", "aten::view_as", "aten::expand_as", "aten::is_nonzero"}


def problem(structures: int, atoms: int, seed: int = 0):
    """(seg, positions, forces(positions)): `structures` Morse clusters of atoms - 4 ... atoms + 4 atoms (a jittered
    cubic lattice; the first quarter of each cluster's atoms fixed)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [atoms - 4 + (i * 3) % 9 for i in range(structures)]
    seg = torch.repeat_interleave(torch.arange(structures), torch.tensor(sizes))
    side = round(max(sizes) ** (1 / 3) + 0.5)
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3).double()
    pos = torch.cat([grid[:k] * 2.6 + 0.25 * torch.randn(k, 3, generator=gen, dtype=torch.float64) for k in sizes])
    fixed = torch.cat([torch.arange(k) < k // 4 for k in sizes])
    pair = (seg[:, None] == seg[None, :]) & ~torch.eye(len(seg), dtype=torch.bool)

    def forces(p: torch.Tensor) -> torch.Tensor:  # Morse, D = 0.5 eV, a = 1.5 / Å, r0 = 2.5 Å
        diff = p[:, None] - p[None, :]
        r = diff.norm(dim=-1).where(pair, 1.0)
        e = torch.exp(-1.5 * (r - 2.5))
        de_dr = (2 * 0.5 * 1.5 * (1 - e) * e).where(pair, 0.0)
        return -(de_dr[..., None] * diff / r[..., None]).sum(1) * (~fixed)[:, None]

    return seg, pos, forces


def count(prof) -> dict[str, int]:
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children) and e.name not in NO_KERNEL]
    return {"top_level": len(top), "all": len(aten), "kernel_like": len(leaves)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structures", type=int, default=8)
    p.add_argument("--atoms", type=int, default=80)
    p.add_argument("--memory", type=int, default=50)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seg, pos, forces = problem(args.structures, args.atoms)
    opt = BatchedLBFGS(LBFGSConfig(memory=args.memory))
    state = opt.new_state(pos.shape[0], args.structures, pos)
    for _ in range(args.memory + 10):
        pos = opt.step(state, pos, forces(pos), seg)
    f = forces(pos)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pos = opt.step(state, pos, f, seg)
    ops = count(prof)
    times = []
    for _ in range(args.repeat):
        f = forces(pos)
        t0 = time.perf_counter()
        pos = opt.step(state, pos, f, seg)
        times.append(time.perf_counter() - t0)
    out = {"structures": args.structures, "atoms": int(seg.shape[0]), "memory": args.memory, "threads": args.threads,
           "aten_ops_per_step": ops, "cpu_ms_per_step_median": 1e3 * statistics.median(times),
           "cpu_ms_per_step_p10_p90": [1e3 * sorted(times)[len(times) // 10], 1e3 * sorted(times)[(9 * len(times)) // 10]],
           "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
