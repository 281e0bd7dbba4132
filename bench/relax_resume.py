#!/usr/bin/env python
"""The in-flight state on a GPU: a batched LBFGS relaxation with a random-weights EquiformerV2, stopped after k
steps, its state written to disk and read back, continued, against the same relaxation uninterrupted; and what
writing the state costs (seconds per save for the whole batch, next to seconds per optimizer step).

    python3 -m bench.relax_resume --model 31M --structures 24 --batch 8 --steps 80 --stop-after 30 --fmax 1e-6 \
        --json $OUT/resume_31M.json

Structures: fcc(111)-like Cu slabs (4x4x4, lower two layers fixed) with an O adatom, rattled, built with numpy
alone (no ASE on the device). Random weights give arbitrary forces: a tiny --fmax makes every structure take all
--steps (the refill then happens at the step limit); the stop must come while structures are in flight. Same weights and inputs in both runs; the comparison is up to float32 model
arithmetic (a structure's batch partners are the same in both runs, the GPU's reductions may differ in order).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eqv2.checkpoint import Potential
from eqv2.config import from_dict, load_yaml
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.normalizers import Normalizers
from eqv2.relaxation import inflight
from eqv2.relaxation.engine import PotentialForces, RelaxConfig, RelaxStats, Structure, make_optimizer, relax

ROOT = Path(__file__).resolve().parents[1]


def slabs(count: int, seed: int) -> list[Structure]:
    a, rng, out = 2.55, np.random.default_rng(seed), []
    cell = np.array([[4 * a, 0, 0], [2 * a, 4 * a * np.sqrt(3) / 2, 0], [0, 0, 3 * a * np.sqrt(2 / 3) + 18.0]])
    for i in range(count):
        pos = [(x + 0.5 * y + (layer % 3) / 3 * 1.5, (y + (layer % 3) / 3) * np.sqrt(3) / 2, layer * np.sqrt(2 / 3))
               for layer in range(4) for y in range(4) for x in range(4)]
        pos = np.asarray(pos) * a
        pos = np.vstack([pos, pos[-1] + [0.5 * a, 0.3 * a, 1.9]])
        fixed = pos[:, 2] < 1.5 * a * np.sqrt(2 / 3)
        pos[~fixed] += rng.normal(0, 0.1, size=((~fixed).sum(), 3))
        out.append(Structure(sid=str(i), numbers=np.array([29] * 64 + [8]), positions=pos, cell=cell, pbc=np.ones(3, bool),
                             fixed=fixed, tags=np.where(fixed, 0, 1)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="31M", help="31M, 153M, ... or a model/run YAML")
    p.add_argument("--structures", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--stop-after", type=int, default=25, help="optimizer steps before the stop")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.model
    raw = load_yaml(name if name.endswith(".yaml") else ROOT / "eqv2" / "configs" / "model" / f"eqv2_{name}.yaml")
    torch.manual_seed(0)
    model = EquiformerV2(from_dict(ModelConfig, raw.get("model", raw), prefix="model"))
    forces = PotentialForces(Potential(model, Normalizers(energy_mean=0.0, energy_std=1.0, forces_std=1.0)).to(device))
    cfg = RelaxConfig(fmax=args.fmax, steps=args.steps, max_structures=args.batch, max_atoms=1 << 30)
    items = slabs(args.structures, 0)

    t0 = time.perf_counter()
    want = {r.structure.sid: r for r in relax(items, forces, cfg, device=device)}
    wall = time.perf_counter() - t0
    iterations = RelaxStats()
    with tempfile.TemporaryDirectory() as tmp:
        path, saves = Path(tmp) / "inflight.0.pt", []

        def save(snap):
            t = time.perf_counter()
            inflight.save(path, snap, cfg, 0, 1)
            saves.append(time.perf_counter() - t)

        calls = []
        first = {r.structure.sid: r for r in relax(items, forces, cfg, device=device, checkpoint=save, checkpoint_every=5,
                                                   stop=lambda: calls.append(1) or len(calls) >= args.stop_after,
                                                   stats=iterations)}
        fresh = make_optimizer(cfg).new_state(1, 1, torch.zeros(0, 3, dtype=torch.float64))
        snap = inflight.load(path, cfg, 0, 1, {s.sid: s for s in items}, fresh)
        rest = [s for s in items if s.sid not in first and s.sid not in {t.sid for t in snap.structures}]
        second = {r.structure.sid: r for r in relax(rest, forces, cfg, device=device, resume=snap)}
        state_mb = path.stat().st_size / 1e6
    got = {**first, **second}
    assert sorted(got) == sorted(want), "a structure was lost or relaxed twice"
    dpos = max(float(np.abs(got[s].positions - want[s].positions).max()) for s in want)
    de = max(abs(got[s].energy - want[s].energy) for s in want)
    same_steps = sum(got[s].steps == want[s].steps for s in want)
    total_steps = sum(r.steps for r in want.values())
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
              "structures": len(want), "batch": args.batch, "continued": len(snap.structures),
              "continued_at_steps": snap.steps, "max_abs_position_difference_A": dpos, "max_abs_energy_difference_eV": de,
              "structures_with_equal_steps": same_steps, "state_file_MB": state_mb,
              "save_s_median": float(np.median(saves)), "seconds_per_batch_iteration": wall / max(1, total_steps / args.batch)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
