#!/usr/bin/env python
"""GPU-seconds per 200-step relaxation: eqv2's batched relaxer against fairchem-core 1.10.0's batched LBFGS,
on the same OC20-sized structures and the same (random) weights, in one process.

    python -m bench.relax --models 31M:16 153M:8 --steps 200 --rounds 2 --reference --mixed --json $OUT/relax.json

Structures: bench/model.py's OC20-like adsorbate+slab systems (~72 atoms), the lower half of each slab fixed.
Every structure runs exactly --steps LBFGS steps (fmax 0: none converges), the OC20/fairchem settings
(maxstep 0.04, memory 50, damping 1, alpha 70). eqv2: `eqv2.relaxation.engine.relax` with the batch as its
structure budget (--eqv2-dtype: fp32, bf16 autocast of the eager reference modules, or fast: `eqv2.inference` in
bf16, i.e. the execution plan's fused kernels, compiled with CUDA graphs per shape bucket, its first batch
checked against fp32 and the differences recorded). fairchem: its `OptimizableBatch` + torch `LBFGS`
(its relaxation code path), the model under fp16 autocast as its trainer predicts with amp; 1.10's
OptimizableBatch is abstract under ASE 3.29 (ASE's Optimizable gained methods its LBFGS never calls), so a
subclass fills them in. GPU-s per relaxation = wall seconds of the timed rounds / structures relaxed.
--mixed adds the refill's efficiency on a split whose structures converge at different steps: each structure
is declared converged after its own number of evaluations (uniform in [steps/4, steps], seeded; random
weights give no real convergence, so the provider zeroes its forces then), --mixed-batches (4) batches' worth
of structures flow through the engine. Two efficiencies against the structure-evaluations/s of a batch that
never changes: `efficiency_vs_full_batch`, the whole flow (its drain included: once the queue is empty the
batch empties too), and `efficiency_while_queue_feeds`, the iterations while the batch is still full
(retirement and refill included), which is what a split of thousands of structures sees. The mixed flow runs twice and the second pass is
timed (the first: `cold`, with its compilations and CUDA-graph recordings of the batch sizes the refill meets).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from eqv2.config import from_dict, load_yaml
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.normalizers import Normalizers
from eqv2.checkpoint import Potential
from eqv2.relaxation.engine import PotentialForces, RelaxConfig, Structure, relax


def structures(count: int, seed: int) -> list[Structure]:
    from bench.model import oc20_like_structures

    out = []
    for i, s in enumerate(oc20_like_structures(count, seed)):
        z = s["positions"][:, 2]
        fixed = z < np.median(z)
        out.append(Structure(sid=str(i), numbers=np.asarray(s["numbers"], np.int64), positions=np.asarray(s["positions"], np.float64),
                             cell=np.asarray(s["cell"], np.float64), pbc=np.ones(3, bool), fixed=fixed,
                             tags=np.where(fixed, 0, 1)))
    return out


def models(name: str, device):
    """(fairchem's legacy EquiformerV2, eqv2's with the same weights)."""
    from eqv2.fairchem_compat import convert_state_dict, fairchem_hparams
    from tests.model.fairchem_reference import import_fairchem

    raw = load_yaml(name if name.endswith(".yaml") else ROOT / "eqv2" / "configs" / "model" / f"eqv2_{name}.yaml")
    cfg = from_dict(ModelConfig, raw.get("model", raw), prefix="model")  # a model config or a run config
    torch.manual_seed(0)
    ours = EquiformerV2(cfg)
    try:
        legacy, _ = import_fairchem()
        hp = fairchem_hparams(cfg)
        hp["otf_graph"] = True
        ref = legacy.EquiformerV2(**hp)
        ours.load_state_dict(convert_state_dict(ref.state_dict(), ours.state_dict()))
        ref = ref.to(device).eval()
    except Exception as err:  # noqa: BLE001 - fairchem is optional here; reported
        print(f"fairchem model unavailable: {type(err).__name__}: {err}", flush=True)
        ref = None
    return ref, Potential(ours, Normalizers(energy_mean=0.0, energy_std=1.0, forces_std=1.0)).to(device).eval()


def fast_path(potential, device):
    """eqv2.inference's fast path (bf16, the plan's kernels, compiled) on a copy of `potential`; its first batch
    is compared with fp32 and the differences recorded (random weights: no tolerance applies)."""
    import copy

    from eqv2.inference import InferenceOptions, prepare

    options = InferenceOptions(precision="bf16", check_batches=1, energy_tolerance=1e30, forces_tolerance=1e30)
    return prepare(copy.deepcopy(potential), device, options, log=lambda line: print(line, flush=True))


def time_eqv2(potential, items, batch: int, steps: int, dtype: str, device, limits: dict | None = None) -> dict:
    """limits: sid -> evaluations after which that structure reports zero forces (converges); None: never."""
    provider = PotentialForces(potential)
    low = dtype == "bf16"  # "fast": the InferencePotential runs its own autocast
    evals, model_s = [0], [0.0]  # structure evaluations; seconds inside the force provider (the model)
    seen: dict[str, int] = {}
    calls: list[tuple[float, int]] = []  # (start time, structures evaluated) of every evaluation

    def forces(b):
        evals[0] += b.num_graphs
        calls.append((time.perf_counter(), b.num_graphs))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            e, f = provider(b)
        if device.type == "cuda":  # the engine waits for the forces right after (its convergence test) anyway
            torch.cuda.synchronize()
        model_s[0] += time.perf_counter() - calls[-1][0]
        f = f.float()
        if limits is not None:
            for sid in b.ids:
                seen[sid] = seen.get(sid, 0) + 1
            stop = torch.tensor([seen[sid] >= limits.get(sid, 1 << 30) for sid in b.ids], device=f.device)
            f = f * (~stop)[b.batch, None]
        return e.float(), f

    cfg = RelaxConfig(fmax=1e-30, steps=steps, max_structures=batch, max_atoms=1 << 30)
    warm = [Structure(**{**s.__dict__, "sid": f"warm{s.sid}"}) for s in items[:batch]]
    list(relax(warm, forces, RelaxConfig(fmax=1e-30, steps=3, max_structures=batch, max_atoms=1 << 30), device=device))
    evals[0], model_s[0] = 0, 0.0
    calls.clear()
    torch.cuda.synchronize() if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    t0 = time.perf_counter()
    done = list(relax(items, forces, cfg, device=device))
    torch.cuda.synchronize() if device.type == "cuda" else None
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    # While the queue still feeds it the batch is full: the evaluation rate of those iterations (each one
    # from its evaluation to the next: optimizer step, retirement and refill included) is what a split of
    # thousands of structures sees; the drain at the end, when the queue is empty, is apart.
    full = [(t1 - t0, n) for (t0, n), (t1, _) in zip(calls, calls[1:] + [(t0 + wall, 0)]) if n == batch]
    full_rate = sum(n for _, n in full) / sum(d for d, _ in full) if full else 0.0
    return {"gpu_s_per_relaxation": wall / len(done), "structures": len(done), "wall_s": wall,
            "evaluations_per_s": evals[0] / wall, "full_batch_evaluations_per_s": full_rate, "peak_gib": peak,
            "model_fraction": model_s[0] / wall}  # the rest: optimizer steps, convergence tests, refills


class _Trainer:
    """What fairchem's OptimizableBatch asks of a trainer: device and predict (fp16 autocast, detached)."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def predict(self, batch, per_image=False, disable_tqdm=True):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            out = self.model(batch)
        return {"energy": out["energy"].reshape(-1).float().detach(), "forces": out["forces"].float().detach()}


def time_fairchem(model, items, batch: int, steps: int, device) -> dict:
    from fairchem.core.common.relaxation.optimizable import OptimizableBatch
    from fairchem.core.common.relaxation.optimizers.lbfgs_torch import LBFGS
    from torch_geometric.data import Batch, Data

    class Optimizable(OptimizableBatch):  # ASE 3.29's abstract methods, unused by fairchem's torch LBFGS
        def ndofs(self):
            return 3 * len(self.batch.pos)

        def get_x(self):
            return self.get_positions().reshape(-1)

        def set_x(self, x):
            self.set_positions(x.reshape(-1, 3))

        def get_gradient(self):
            return -self.get_forces().reshape(-1)

        def get_value(self):
            return self.get_potential_energy()

    def pyg(group):
        return Batch.from_data_list([Data(pos=torch.tensor(s.positions, dtype=torch.float32),
                                          atomic_numbers=torch.tensor(s.numbers, dtype=torch.float32),
                                          cell=torch.tensor(s.cell, dtype=torch.float32).view(1, 3, 3),
                                          pbc=torch.ones(1, 3, dtype=torch.bool), natoms=len(s.numbers),
                                          fixed=torch.tensor(s.fixed, dtype=torch.float32), sid=s.sid,
                                          tags=torch.tensor(s.tags)) for s in group])

    trainer = _Trainer(model, device)
    opts = dict(maxstep=0.04, memory=50, damping=1.0, alpha=70.0, save_full_traj=False)
    LBFGS(Optimizable(pyg(items[:batch]), trainer), **opts).run(fmax=0.0, steps=3)  # warm-up
    torch.cuda.synchronize() if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        LBFGS(Optimizable(pyg(items[i:i + batch]), trainer), **opts).run(fmax=0.0, steps=steps)
    torch.cuda.synchronize() if device.type == "cuda" else None
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"gpu_s_per_relaxation": wall / len(items), "structures": len(items), "wall_s": wall, "peak_gib": peak}


def dump(path: Path | None, rows: list) -> None:
    """Written after every measurement: a run cut short keeps what it measured."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"results": rows}, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["31M:16", "153M:8"], help="NAME:BATCH (eqv2/configs/model/eqv2_NAME.yaml) or CONFIG.yaml:BATCH")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="full batches relaxed per measurement")
    p.add_argument("--eqv2-dtype", nargs="+", choices=["fp32", "bf16", "fast"], default=["fast", "bf16", "fp32"])
    p.add_argument("--reference", action="store_true", help="also time fairchem-core 1.10.0's batched LBFGS")
    p.add_argument("--mixed", action="store_true", help="also the refill efficiency on a mixed split (eqv2, first dtype)")
    p.add_argument("--mixed-batches", type=int, default=4, help="batches' worth of structures in the mixed split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for spec in args.models:
        name, _, batch = spec.rpartition(":")
        batch = int(batch)
        items = structures(batch * args.rounds, seed=0)
        ref, potential = models(name, device)
        row = {"model": name, "batch": batch, "steps": args.steps, "mean_atoms": float(np.mean([len(s.numbers) for s in items])),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        runners = {}
        for dtype in args.eqv2_dtype:
            runners[dtype] = fast_path(potential, device) if dtype == "fast" else potential
            row[f"eqv2_{dtype}"] = time_eqv2(runners[dtype], items, batch, args.steps, dtype, device)
            if dtype == "fast":
                row["eqv2_fast"].update(inference=runners[dtype].describe(),
                                        check_vs_fp32=[c.__dict__ for c in runners[dtype].checks])
            print(name, batch, f"eqv2 {dtype}", row[f"eqv2_{dtype}"], flush=True)
            dump(args.json, rows + [row])
        if args.mixed:
            dtype = args.eqv2_dtype[0]
            flow = structures(batch * args.mixed_batches, seed=1)
            rng = np.random.default_rng(0)
            limits = {s.sid: int(rng.integers(args.steps // 4, args.steps + 1)) for s in flow}
            cold = time_eqv2(runners[dtype], flow, batch, args.steps, dtype, device, limits)
            mixed = time_eqv2(runners[dtype], flow, batch, args.steps, dtype, device, limits)
            mixed["cold"] = cold
            full = row[f"eqv2_{dtype}"]
            mixed["efficiency_vs_full_batch"] = mixed["evaluations_per_s"] / full["evaluations_per_s"]
            mixed["efficiency_while_queue_feeds"] = mixed["full_batch_evaluations_per_s"] / full["evaluations_per_s"]
            row[f"eqv2_{dtype}_mixed"] = mixed
            print(name, batch, f"eqv2 {dtype} mixed", mixed, flush=True)
        dump(args.json, rows + [row])
        if args.reference and ref is not None:
            try:
                row["fairchem_amp16"] = time_fairchem(ref, items, batch, args.steps, device)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory; reported in the row
                row["fairchem_amp16"] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print(name, batch, "fairchem", row["fairchem_amp16"], flush=True)
        rows.append(row)
        del ref, potential, runners
        torch._dynamo.reset()  # the next model's compilations start a fresh cache
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
