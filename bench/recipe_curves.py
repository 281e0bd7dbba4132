#!/usr/bin/env python
"""Validation curves of eqv2's training recipe against fairchem-core 1.10.0's, over thousands of steps.

The step-by-step comparison (diagnostics/recipe_parity.py, tests/train/test_recipe_parity.py) shows that one
step of eqv2's trainer equals one of fairchem's to round-off.  This benchmark asks the user's question
over a whole run: with the same data, the same initial weights and the same batch order, do the two
trainers reach the same validation energy and force MAE (live and EMA weights), within fairchem's own
seed-to-seed spread?  Unlike the step-by-step tool it runs each trainer as it trains for real:
dropout and stochastic depth on as the model config sets them (each side draws its own masks, so the
two runs part after the first step and agree, if they do, as two seeds do; `--no-dropout` turns
them off), and fairchem with its own random roll of every edge frame (eqv2's frames have zero roll;
the model is invariant to the roll up to round-off; `--reference-frames eqv2` removes even that).

For each seed, one process trains both sides step by step on the same batch (or, with `--side`,
two processes one side each, e.g. in parallel on one GPU) (seed → initial weights
from fairchem's initialisation, converted to eqv2, and the batch order), and evaluates both every
`--eval-every` steps on the same validation set with eqv2's metric code (S2EFMetrics: energy MAE,
force MAE on free atoms).  Records go to `--jsonl` as they are made, so a run cut short by a time
limit (`--time-limit`) keeps its curves up to the last evaluation.  `--summary` turns the records of
several seeds into the table of BENCHMARKS.md.

Data: adsorbate + fcc(111) slab structures with EMT energies and forces (5 metals × 4 adsorbates ×
3 sites, rattled, bottom layer fixed); energies referenced per element by least squares on the
training set (as OC20's adsorption energies are referenced), the same targets for both sides.

    python -m bench.recipe_curves --model configs/model/eqv2_31M.yaml --set num_layers=4 \\
        --steps 2000 --seed 0 --jsonl curves_s0.jsonl          # one per seed, in parallel on one GPU
    python -m bench.recipe_curves --summary curves_s*.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diagnostics import recipe_parity as rp
from eqv2.batch import AtomsBatch
from eqv2.config import apply_overrides, from_dict, load_yaml
from eqv2.fairchem_compat import convert_state_dict, fairchem_hparams
from eqv2.model.config import ModelConfig
from eqv2.model.equiformer_v2 import EquiformerV2
from eqv2.model.graph import GraphBuilder
from eqv2.training.loss import LossConfig, Normalizers
from eqv2.training.metrics import S2EFMetrics
from eqv2.training.optim import OptimConfig


def referenced(structures: list[dict], refs: np.ndarray | None = None) -> tuple[list[dict], np.ndarray]:
    """Structures with energies minus per-element references (fitted here by least squares when not given)."""
    counts = np.stack([np.bincount(s["numbers"], minlength=100) for s in structures]).astype(float)
    if refs is None:
        energies = np.array([s["energy"] for s in structures])
        refs = np.linalg.lstsq(counts, energies, rcond=None)[0]
    out = [dict(s, energy=float(s["energy"] - c @ refs)) for s, c in zip(structures, counts)]
    return out, refs


class FairchemTrainer(rp.FairchemSide):
    """fairchem's training step as `rp.FairchemSide`, with a prediction in eV and eV/Å for validation."""

    @torch.no_grad()
    def predict(self, batch: AtomsBatch) -> dict[str, torch.Tensor]:
        t, fc, data = self.trainer, self.fc, rp.pyg_batch(batch)
        out = fc.OCPTrainer._forward(t, data)
        return {k: fc.OCPTrainer._denorm_preds(t, k, out[k], data).detach().reshape(-1 if k == "energy" else (-1, 3))
                for k in ("energy", "forces")}


def evaluate(predict, val: list[AtomsBatch]) -> dict[str, float]:
    metrics = S2EFMetrics(val[0].pos.device, free_only=True)
    for batch in val:
        metrics.update(predict(batch), batch)
    m = metrics.compute()
    return {"energy_mae": m["energy_mae"], "forces_mae": m["forces_mae"],
            "energy_mae_zero_baseline": m["energy_mae_zero_baseline"]}


def run(args) -> None:
    fc = rp.import_fairchem()
    raw = {**rp.SMALL} if args.model is None else load_yaml(args.model)
    apply_overrides(raw, args.set)
    cfg = from_dict(ModelConfig, {**raw, **(rp.NO_DROPOUT if args.no_dropout else {})}, prefix="model")
    dtype, device = torch.float32, args.device
    train, refs = referenced(rp.emt_structures(args.train, 1000))
    val, _ = referenced(rp.emt_structures(args.val, 2000), refs)
    graphs = GraphBuilder.for_model(cfg)
    val_batches = [graphs(AtomsBatch.from_arrays(val[k:k + args.eval_batch], float_dtype=dtype)).to(device)
                   for k in range(0, len(val), args.eval_batch)]
    energies = np.array([s["energy"] for s in train])
    forces = np.concatenate([s["forces"] for s in train])
    norms = Normalizers(float(energies.mean()), float(energies.std()), float(np.sqrt((forces ** 2).mean())))

    torch.manual_seed(args.seed)
    ref = fc.legacy.EquiformerV2(**fairchem_hparams(cfg)).to(device, dtype).train()
    ours = EquiformerV2(cfg).to(device, dtype).train()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours.state_dict()))
    R = rp.RECIPE
    optim = OptimConfig(lr=R["lr"], weight_decay=R["weight_decay"], max_epochs=1, warmup_epochs=args.warmup,
                        warmup_factor=R["warmup_factor"], lr_min_factor=R["lr_min_factor"], ema_decay=R["ema_decay"])
    total, warmup = optim.resolve_steps(args.steps)
    eq = rp.Eqv2Side(ours, optim, LossConfig(energy_coef=R["energy_coef"], force_coef=R["force_coef"]),
                     norms, total, warmup, R["clip"])
    fs = FairchemTrainer(fc, ref, norms, args.steps, args.warmup, dtype, device,
                         own_frames=args.reference_frames == "random")

    def eqv2_predict(batch):
        return norms.denormalise(ours(batch))

    sides = ("eqv2", "fairchem") if args.side == "both" else (args.side,)

    def validate(step: int) -> dict:
        rec = {"seed": args.seed, "step": step}
        ours.eval(), ref.eval()
        if "eqv2" in sides:
            rec["eqv2_live"] = evaluate(eqv2_predict, val_batches)
            with eq.ema.swapped_in():
                rec["eqv2_ema"] = evaluate(eqv2_predict, val_batches)
        if "fairchem" in sides:
            rec["fairchem_live"] = evaluate(fs.predict, val_batches)
            fs.trainer.ema.store()
            fs.trainer.ema.copy_to()
            rec["fairchem_ema"] = evaluate(fs.predict, val_batches)
            fs.trainer.ema.restore()
        ours.train(), ref.train()
        return rec

    rng = np.random.default_rng(args.seed)
    out = open(args.jsonl, "w") if args.jsonl else None
    start, order, losses = time.time(), [], {side: [] for side in sides}
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order += list(rng.permutation(len(train)))
        chosen, order = order[:args.batch_size], order[args.batch_size:]
        batch = graphs(AtomsBatch.from_arrays([train[i] for i in chosen], float_dtype=dtype)).to(device)
        for side in sides:
            losses[side].append((eq if side == "eqv2" else fs).train_step(batch)["loss"])
        last = step == args.steps or time.time() - start > args.time_limit
        if step % args.eval_every == 0 or last:
            rec = validate(step)
            rec["train_loss"] = {k: float(np.mean(v)) for k, v in losses.items()}
            rec["elapsed_s"] = round(time.time() - start, 1)
            rec["dropout"] = {k: getattr(cfg, k) for k in ("alpha_drop", "drop_path_rate", "proj_drop")}
            losses = {side: [] for side in sides}
            line = json.dumps(rec)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
        if last:
            break


def summary(paths: list[str]) -> str:
    """Markdown table: per evaluated step, the mean ± std over seeds of each side's validation MAE."""
    merged: dict[tuple, dict] = {}  # one record per (seed, step), from one file per side or one for both
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                merged.setdefault((r["seed"], r["step"]), {}).update(r)
    records = list(merged.values())
    steps = sorted({r["step"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    sides = ("eqv2_live", "fairchem_live", "eqv2_ema", "fairchem_ema")
    rows = ["| step | seeds | " + " | ".join(f"{s} E MAE (meV)" for s in sides) + " | "
            + " | ".join(f"{s} F MAE (meV/Å)" for s in sides) + " |",
            "|---|---|" + "---|" * (2 * len(sides))]
    for step in steps:
        at = [r for r in records if r["step"] == step and all(side in r for side in sides)]
        if len(at) < len(seeds):
            continue  # a seed or side that stopped earlier (time limit): only steps all of them reached

        def cell(side, key):
            v = 1000 * np.array([r[side][key] for r in at])
            return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"
        rows.append(f"| {step} | {len(at)} | " + " | ".join(cell(s, "energy_mae") for s in sides) + " | "
                    + " | ".join(cell(s, "forces_mae") for s in sides) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model YAML (default: recipe_parity's small model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--no-dropout", action="store_true", help="dropout and stochastic depth off on both sides")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the run")
    p.add_argument("--train", type=int, default=1200, help="training structures")
    p.add_argument("--val", type=int, default=120, help="validation structures")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batch", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=["both", "eqv2", "fairchem"], default="both",
                   help="train one side only (run the other in a second process: same weights, batches)")
    p.add_argument("--reference-frames", choices=["random", "eqv2"], default="random",
                   help="fairchem's own random edge-frame roll (default) or eqv2's zero-roll frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--time-limit", type=float, default=float("inf"), help="stop (after an evaluation) after this many s")
    p.add_argument("--jsonl", default=None, help="write each evaluation's record here as it is made")
    p.add_argument("--summary", nargs="+", default=None, metavar="JSONL", help="tabulate earlier runs and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
