"""`eqv2 relax`: batched relaxations (IS2RS / IS2RE) with a trained model, resumable, metrics when the
inputs carry DFT-relaxed targets.

    eqv2 relax --checkpoint model.pt --input /data/is2re/all/val_id/data.lmdb --output relax/val_id
    eqv2 relax --checkpoint model.pt --input init.extxyz --output relax/mine --optimizer fire --trajectories
    eqv2 relax --calculator ase.calculators.emt:EMT --input set.extxyz --output relax/emt   # any ASE calculator
    eqv2 relax --collect relax/val_id --oracle my_dft:Calculator                              # metrics + AFbT
    eqv2 relax --checkpoint model.pt --input init.extxyz --output relax/ref --precision fp32  # float32 reference path

Results are written per structure as it finishes (OUT/results.<task>.jsonl), and the structures in
flight (positions, steps, optimizer state) every --checkpoint-every steps and on SIGTERM / SIGUSR1
(OUT/inflight.<task>.pt; the job then exits 75, to be requeued): a rerun on the same OUT skips the
finished structures and continues the in-flight ones where they were. With --num-tasks N (a SLURM
array: slurm/relax.sh), task i relaxes structures i, i+N, ...; under torchrun each rank is a task
(RANK of WORLD_SIZE, GPU LOCAL_RANK).
The task that finishes last writes is2rs.npz, is2re.npz and metrics.json (`--collect OUT` does it again).
On CUDA the model runs the fast path by default (eqv2/inference.py: bf16, fused kernels, compiled with CUDA
graphs per shape bucket; the first batch checked against float32, falling back to it outside the tolerance);
the optimizer always works in float64 and gives the model float32 positions.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eqv2.relaxation.engine import AseForces, PotentialForces, RelaxConfig, RelaxStats, relax
from eqv2.relaxation.optimizers import FIREConfig, LBFGSConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqv2 relax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="eqv2 model file (eqv2.load_model): energies in eV with its references")
    src.add_argument("--calculator", metavar="MODULE:CLASS", help="relax with an ASE calculator instead of a model")
    p.add_argument("--input", action="append", default=[], help="IS2RE/IS2RS LMDB (file or folder), manifest.json, "
                   "or ASE-readable file (repeatable)")
    p.add_argument("--output", help="output directory (results, trajectories, metrics)")
    p.add_argument("--collect", metavar="OUT", help="only merge OUT's results into is2rs.npz, is2re.npz, metrics.json")
    p.add_argument("--optimizer", choices=("lbfgs", "fire"), default="lbfgs")
    p.add_argument("--fmax", type=float, default=0.02, help="eV/Å convergence on free atoms (fairchem: 0.02)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per structure (fairchem OC20: 300)")
    p.add_argument("--max-atoms", type=int, default=2000, help="atom budget of one batch")
    p.add_argument("--max-structures", type=int, default=0, help="structures per batch (0: atom budget only)")
    d = LBFGSConfig()
    p.add_argument("--lbfgs-maxstep", type=float, default=d.maxstep)
    p.add_argument("--lbfgs-memory", type=int, default=d.memory)
    p.add_argument("--lbfgs-damping", type=float, default=d.damping)
    p.add_argument("--lbfgs-alpha", type=float, default=d.alpha)
    f = FIREConfig()
    p.add_argument("--fire-dt", type=float, default=f.dt)
    p.add_argument("--fire-maxstep", type=float, default=f.maxstep)
    p.add_argument("--fire-dtmax", type=float, default=f.dtmax)
    p.add_argument("--trajectories", action="store_true", help="write OUT/trajectories/<sid>.traj (ASE)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS",
                   help="write the in-flight state every STEPS optimizer steps (0: only on SIGTERM/SIGUSR1)")
    p.add_argument("--discard-inflight", action="store_true",
                   help="ignore OUT/inflight.<task>.pt: relax its structures again from their initial positions")
    p.add_argument("--task-index", type=int, default=0)
    p.add_argument("--num-tasks", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="relax only the first N structures of this task")
    p.add_argument("--oracle", metavar="MODULE:CLASS", help="ASE calculator for AFbT single points (e.g. DFT)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    from eqv2.inference import add_arguments

    add_arguments(p)
    return p


def _config(args) -> RelaxConfig:
    return RelaxConfig(optimizer=args.optimizer, fmax=args.fmax, steps=args.steps, max_atoms=args.max_atoms,
                       max_structures=args.max_structures,
                       lbfgs=LBFGSConfig(args.lbfgs_maxstep, args.lbfgs_memory, args.lbfgs_damping, args.lbfgs_alpha),
                       fire=FIREConfig(dt=args.fire_dt, maxstep=args.fire_maxstep, dtmax=args.fire_dtmax))


def collect_metrics(out_dir: Path, oracle: str | None) -> dict:
    from eqv2.relaxation.metrics import afbt_metrics, is2re_metrics, is2rs_metrics, load_oracle
    from eqv2.relaxation.results import collect, load_results

    is2rs, is2re, count = collect(out_dir)
    results = list(load_results(out_dir).values())
    metrics = {"num_structures": count, "converged": sum(r.converged for r in results),
               "mean_steps": sum(r.steps for r in results) / count,
               "is2re": is2re_metrics(results), "is2rs": is2rs_metrics(results)}
    if oracle:
        metrics["is2rs"].update({k: v for k, v in afbt_metrics(results, load_oracle(oracle)).items() if k != "num_structures"})
    tmp = out_dir / f".metrics.{os.getpid()}.json"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out_dir / "metrics.json")  # two tasks finishing together both write the same file
    return metrics


def _print_metrics(metrics: dict, out_dir: Path) -> None:
    print(f"{metrics['num_structures']} structures, {metrics['converged']} converged, {metrics['mean_steps']:.1f} steps on average")
    for task in ("is2re", "is2rs"):
        for key, value in metrics[task].items():
            if key != "num_structures":
                print(f"  {task} {key:<52} {value:.4f}")
    print(f"wrote {out_dir}/is2rs.npz, is2re.npz, metrics.json")


def run(args) -> int:
    from eqv2.relaxation import inflight
    from eqv2.relaxation.engine import make_optimizer
    from eqv2.relaxation.inputs import read_inputs
    from eqv2.relaxation.results import ResultWriter, Trajectories, load_results
    from eqv2.training.signals import EXIT_REQUEUE, StopFlag

    cfg = _config(args)
    if args.num_tasks == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one task per rank
        args.task_index, args.num_tasks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and args.device is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    if not 0 <= args.task_index < args.num_tasks:
        raise ValueError(f"--task-index {args.task_index} outside 0..{args.num_tasks - 1} (--num-tasks)")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    out = Path(args.output)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.checkpoint:
        from eqv2.inference import load_for_inference, options_from_args

        potential = load_for_inference(args.checkpoint, device, options_from_args(args))
        print(f"task {args.task_index}: {potential.describe()}", file=sys.stderr)
        forces, float_dtype = PotentialForces(potential), torch.float32
    else:
        from eqv2.relaxation.metrics import load_oracle

        forces, float_dtype = AseForces(load_oracle(args.calculator)), torch.float64  # a calculator gets exact positions
    out.mkdir(parents=True, exist_ok=True)
    (out / f".done.{args.task_index}").unlink(missing_ok=True)
    done = set(load_results(out))
    mine = itertools.islice(read_inputs(args.input), args.task_index, None, args.num_tasks)
    if args.limit:
        mine = itertools.islice(mine, args.limit)
    todo = list(mine)  # read up front (inputs are checked before any work; the bar knows the total)
    skipped = sum(s.sid in done for s in todo)
    state_file = inflight.state_path(out, args.task_index)
    resume = None
    if state_file.exists() and args.discard_inflight:
        state_file.unlink()
        print(f"--discard-inflight: removed {state_file}; its structures start again from their initial positions")
    elif state_file.exists():
        fresh = make_optimizer(cfg).new_state(1, 1, torch.zeros(0, 3, dtype=torch.float64))
        resume = inflight.load(state_file, cfg, args.task_index, args.num_tasks, {s.sid: s for s in todo}, fresh)
        resume = resume.without(done)  # finished after the state was written
    continuing = {s.sid for s in resume.structures} if resume else set()
    todo = [s for s in todo if s.sid not in done and s.sid not in continuing]

    writer = ResultWriter(out, args.task_index)
    traj = Trajectories(out / "trajectories") if args.trajectories else None
    if traj and resume:
        for s, steps in zip(resume.structures, resume.steps):
            traj.resume(s.sid, steps)  # one frame per evaluation: `steps` evaluations came before the state
    stats, flag = RelaxStats(), StopFlag().install()
    start, count, evals = time.time(), 0, 0
    bar = tqdm(total=len(todo) + len(continuing), desc=f"relax task {args.task_index}", unit="structure",
               file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        for result in relax(todo, forces, cfg, device=device, float_dtype=float_dtype, on_frame=traj.frame if traj else None,
                            resume=resume, checkpoint_every=args.checkpoint_every, stop=lambda: flag.requested, stats=stats,
                            checkpoint=lambda snap: inflight.save(state_file, snap, cfg, args.task_index, args.num_tasks)):
            writer.write(result)
            if traj:
                traj.finish(result.structure.sid)
            count += 1
            evals += result.steps + 1
            bar.update()
            bar.set_postfix(evaluations_each=f"{evals / count:.1f}", refresh=False)
    finally:
        flag.restore()
        bar.close()
        writer.close()
        if traj:
            traj.close()
    cont = f", {len(stats.resumed)} continued from {state_file}" if stats.resumed else ""
    print(f"task {args.task_index}: relaxed {count} structures in {time.time() - start:.1f} s"
          f"{f', {skipped} already done' if skipped else ''}{cont}; {stats.evaluations} structure evaluations; "
          f"results in {writer.path}")
    if stats.stopped:
        left = f"in-flight state in {state_file}" if state_file.exists() else "nothing was in flight"
        print(f"task {args.task_index}: stopped on {flag.reason}; {left}; run the same command again to continue")
        return EXIT_REQUEUE
    state_file.unlink(missing_ok=True)  # nothing is in flight any more
    (out / f".done.{args.task_index}").write_text(f"{args.num_tasks}\n")
    if all((out / f".done.{i}").exists() for i in range(args.num_tasks)):  # the last task to finish collects
        _print_metrics(collect_metrics(out, args.oracle), out)
    else:
        print(f"other tasks still running; the last one writes the metrics (or: eqv2 relax --collect {out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.collect:
            out = Path(args.collect)
            _print_metrics(collect_metrics(out, args.oracle), out)
            return 0
        if not args.input or not args.output or not (args.checkpoint or args.calculator):
            raise ValueError("give --input, --output and one of --checkpoint / --calculator (or --collect OUT)")
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"eqv2 relax: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
