"""S2EF evaluation of a trained, exported or converted model on one or more sharded splits.

    eqv2 evaluate --checkpoint model_153M.pt --split val_id=data/val_id/manifest.json \\
        --split val_ood_ads=data/val_ood_ads/manifest.json --split val_ood_cat=... --split val_ood_both=... \\
        --json val.json
    eqv2 evaluate --checkpoint runs/demo/checkpoints --weights live --split val=data/demo/val/manifest.json
    eqv2 evaluate --checkpoint runs/demo/checkpoints/step_00000400 --split val=... --limit 20   # a quick look
    torchrun --nproc_per_node 8 -m eqv2.evaluate --checkpoint model.pt --split ...           # on 8 GPUs
    eqv2 evaluate --checkpoint model.pt --split val=... --precision fp32                    # the reference path

The checkpoint is a model file (`eqv2 export`, `eqv2 convert`), a run's
`checkpoints/` directory (its newest complete checkpoint) or one `step_*` directory (EMA weights by
default). Metrics are the trainer's (energy MAE, force MAE over free-atom components, force cosine,
EwT, the baselines): each split's every structure is counted exactly once over all ranks (any
launcher the trainer accepts), and with several splits their plain mean is reported as `average`,
as the paper averages the four OC20 validation splits. Results: a printed table and, with --json, a
file. --limit N evaluates only the first N batches of every rank (the result says so).
On CUDA the model runs the fast path by default (eqv2/inference.py: bf16 with the precision-sensitive parts in
float32, the fused kernels, compiled with CUDA graphs per shape bucket), each rank's first batch checked against
float32 (--check-precision N, --precision-tolerance; outside it, precision auto falls back to float32 and bf16
stops); on the CPU, and with --precision fp32, the float32 reference path.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from eqv2.config import ConfigError
from eqv2.tools.common import add_quiet

METRICS = ("energy_mae", "forces_mae", "forces_cos", "energy_forces_within_threshold")


def load_potential(path: str, weights: str):
    """A `Potential` (the model with its normalisers, eV and eV/Å out) from a model file or a run checkpoint."""
    from eqv2.checkpoint import Normalizers, Potential, load_model
    from eqv2.config import from_dict
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from eqv2.training.finetune import read_pretrained

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--checkpoint: not found: {p}")
    if p.is_file():
        return load_model(p)
    pretrained = read_pretrained(str(p), weights)
    model = EquiformerV2(from_dict(ModelConfig, pretrained.model_config, prefix="model"))
    model.load_state_dict(pretrained.state_dict)
    n = pretrained.normalizers
    norms = Normalizers.from_mapping(n)  # older run checkpoints: force_rms
    return Potential(model, norms, {"source": pretrained.source}, pretrained.energy_references)


def parse_splits(items: list[str]) -> dict[str, str]:
    splits = {}
    for item in items:
        name, sep, manifest = item.partition("=")
        if not sep or not name or not manifest:
            raise ConfigError(f"--split {item!r}: expected NAME=MANIFEST (e.g. val_id=data/val_id/manifest.json)")
        if name in splits:
            raise ConfigError(f"--split {name}: given twice")
        if not Path(manifest).is_file():
            raise ConfigError(f"--split {name}: manifest not found: {manifest}")
        splits[name] = manifest
    return splits


@torch.no_grad()
def evaluate_split(potential, name: str, manifest: str, args, dist, graphs) -> dict:
    """Metrics of one split (None where it has no labels: a test split) and, with --predictions, its
    prediction file."""
    from tqdm import tqdm

    from eqv2.tools.common import show_progress
    from eqv2.data import DataConfig, num_val_batches, val_batches
    from eqv2.predictions import PredictionWriter
    from eqv2.training.dist import all_reduce_max, barrier
    from eqv2.training.metrics import S2EFMetrics

    batch_size = 0 if args.max_atoms else args.batch_size
    cfg = DataConfig(train_manifest=manifest, val_manifest=manifest, batch_size=batch_size, max_atoms=args.max_atoms,
                     num_workers=args.workers, require_labels=False)
    full = num_val_batches(cfg, dist.world_size)
    total = min(full, args.limit) if args.limit else full
    refs = potential.energy_references  # the mean baseline as the trainer's: energy mean (+ references)
    metrics = S2EFMetrics(dist.device, not args.all_atoms, potential.normalizers.energy_mean,
                          None if refs is None else refs.to(dist.device))
    writer = PredictionWriter() if args.predictions else None
    unlabelled = 0.0
    bar = tqdm(total=total, unit="batch", disable=True if not dist.is_main else show_progress(args.quiet), desc=name)
    for i, batch in enumerate(val_batches(cfg, dist.rank, dist.world_size, graphs)):
        if i >= total:
            break
        batch = batch.to(dist.device, non_blocking=True)
        pred = potential(batch)  # eqv2.inference: float32 outputs whatever the precision
        if batch.energy is None or batch.forces is None:
            unlabelled = 1.0
        else:
            metrics.update(pred, batch)
        if writer is not None:
            writer.add(pred, batch)
        bar.update(1)
    bar.close()
    out = {"num_structures": None}
    if float(all_reduce_max(torch.tensor([unlabelled], dtype=torch.float64, device=dist.device))) == 0.0:
        out = metrics.compute()
    if writer is not None:
        parts = Path(args.predictions) / ".parts"
        writer.write_part(parts / f"{name}.rank{dist.rank}.npz")
        barrier()
        if dist.is_main:
            count = PredictionWriter.merge([parts / f"{name}.rank{r}.npz" for r in range(dist.world_size)],
                                           Path(args.predictions) / f"{name}.npz", args.prediction_dtype)
            out["num_structures"] = out["num_structures"] or count
            out["predictions"] = str(Path(args.predictions) / f"{name}.npz")
        barrier()
    out["batches_per_rank"] = total
    out["complete"] = total == full
    return out


def table(results: dict[str, dict]) -> str:
    labelled = [r for r in results.values() if "energy_mae" in r]
    keys = [k for k in METRICS if labelled and all(k in r for r in labelled)]
    keys += [k for k in ("energy_mae_mean_baseline", "energy_mae_zero_baseline", "forces_mae_zero_baseline")
             if labelled and all(k in r for r in labelled)]
    head = ["split", *(keys or ["metrics"]), "structures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [f"{r[k]:.5g}" for k in keys] if "energy_mae" in r else ["– (no labels)"] * max(len(keys), 1)
        count = f"{int(r['num_structures'] or 0)}" + ("" if r.get("complete", True) else " (--limit)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {count} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqv2 evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model file, run checkpoints/ directory or step_* directory")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema", help="for run checkpoints")
    parser.add_argument("--split", action="append", required=True, metavar="NAME=MANIFEST",
                        help="a split to evaluate (repeat for several)")
    parser.add_argument("--batch-size", type=int, default=8, help="structures per batch")
    parser.add_argument("--max-atoms", type=int, default=0, help="atom budget per batch instead of --batch-size")
    parser.add_argument("--limit", type=int, default=0, help="only the first N batches of every rank")
    parser.add_argument("--workers", type=int, default=0, help="loader processes per rank: they read the shards, "
                        "build the radius graphs and pad each batch to its shape bucket (0: the rank itself)")
    parser.add_argument("--all-atoms", action="store_true", help="force metrics over all atoms, not only free ones")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--predictions", type=Path, help="write each split's predictions as DIR/<split>.npz "
                        "(fairchem's S2EF layout: ids, energy, free-atom forces, chunk_idx); splits without labels "
                        "(test splits, sharded with --unlabelled) are only predicted")
    parser.add_argument("--prediction-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--submission", type=Path, help="also join the splits id, ood_ads, ood_cat, ood_both into "
                        "the OC20 evaluation server's S2EF file (needs --predictions)")
    from eqv2.inference import add_arguments, options_from_args, prepare

    add_arguments(parser)
    add_quiet(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_atoms < 0 or args.limit < 0 or args.workers < 0:
        parser.error("--batch-size must be >= 1, --max-atoms, --limit and --workers >= 0")
    if args.submission and not args.predictions:
        parser.error("--submission needs --predictions DIR (where the split files go)")
    from eqv2.data.format import SampleError
    from eqv2.buckets import loader_prepare
    from eqv2.model.graph import GraphBuilder, GraphInputError
    from eqv2.training.checkpointing import CheckpointError
    from eqv2.training.dist import init_distributed, shutdown

    try:
        options = options_from_args(args)
        splits = parse_splits(args.split)
        potential = load_potential(args.checkpoint, args.weights)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"eqv2 evaluate: {err}", file=sys.stderr)
        return 2
    dist = init_distributed()
    code = 1
    try:
        potential = prepare(potential.to(dist.device).eval(), dist.device, options,
                            log=lambda line: print(f"eqv2 evaluate (rank {dist.rank}): {line}", file=sys.stderr))
        if dist.is_main:
            print(f"eqv2 evaluate: {potential.describe()}", file=sys.stderr)
        # the loader builds each batch's graph and pads it to the plan's shape bucket (in its workers with
        # --workers), so the model's bucket hooks find the bucket made and the rank only runs the model
        graphs = loader_prepare(GraphBuilder.for_model(potential.config), potential.plan)
        if args.submission:
            from eqv2.predictions import OC20_SPLITS

            if sorted(splits) != sorted(OC20_SPLITS):
                raise ValueError(f"--submission needs exactly the splits {', '.join(OC20_SPLITS)} "
                                 f"(got {', '.join(splits)})")
        results = {name: evaluate_split(potential, name, manifest, args, dist, graphs)
                   for name, manifest in splits.items()}
        parts = [r for r in results.values() if "energy_mae" in r]
        if len(parts) > 1:
            average = {k: sum(r[k] for r in parts) / len(parts) for k in parts[0]
                       if k not in ("complete", "batches_per_rank", "num_structures", "predictions")}
            average.update(num_structures=sum(r["num_structures"] for r in parts),
                           complete=all(r["complete"] for r in parts))
            results["average"] = average
        if dist.is_main:
            if args.submission:
                from eqv2.predictions import write_submission

                write_submission({n: Path(r["predictions"]) for n, r in results.items() if "predictions" in r},
                                 args.submission)
                print(f"eqv2 evaluate: wrote the S2EF submission {args.submission}")
            print(table(results))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "weights": args.weights,
                                                 "world_size": dist.world_size, "splits": splits,
                                                 "inference": potential.describe(),
                                                 "precision_checks": [c.__dict__ for c in potential.checks],
                                                 "results": results}, indent=2))
        code = 0
    except (SampleError, GraphInputError, ValueError) as err:
        print(f"eqv2 evaluate (rank {dist.rank}): {err}", file=sys.stderr)
        code = 2
    finally:
        shutdown(clean=code == 0)
    return code


if __name__ == "__main__":
    from eqv2.training.dist import exit_process

    exit_process(main())  # after main's own teardown (training/dist.py says why)
