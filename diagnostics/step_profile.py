#!/usr/bin/env python
"""Where the trainer's step time goes, and how long it takes from launch to the first step.

Launches the real trainer (`eqv2/train.py`, one rank, the run config as published: its model, execution
plan, compilation and shape buckets; `bench/scaling.py`'s launch) on OC20-sized shards for `--steps`
steps with `log.profile_steps` set, and collects into one JSON per run config:

- `profile`: the profiled steps by category (rotations / Wigner products, SO(2) convolutions, S²
  activation, attention, layer norms, feed-forward, graph and edge frames, loss, optimizer step, EMA,
  gradient clipping, communication, ...), GPU busy / idle time per step and the host synchronisations
  per step with the phase each was in (training/profile_breakdown.py, the trainer's
  `profile_rank0.json`);
- `startup`: launch to first step by phase (training/startup.py, the trainer's `startup.json`), plus
  `tool_to_process_s`, from this tool's launch call to the trainer process's start;
- `intervals`: the metrics.jsonl records (samples/s, compilations and CUDA-graph recordings per
  interval), so a profiled interval that met a new shape bucket can be told apart.

    python -m bench.make_oc20_sized_data --out /tmp/oc20 --train 800 --val 64 --workers 16
    python -m diagnostics.step_profile --runs oc20_all_md_153M oc20_all_md_31M --data /tmp/oc20 \
        --steps 60 --profile 56 58 --out-dir $OUT

Also runs on the CPU (a small run config and `ds_configs/cpu_demo.json`) for its test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profile_run(config: Path, data: Path, ds_config: Path, work: Path, steps: int, profile: tuple[int, int],
                micro_batch: int | None, log_every: int, extra_sets: list[str], timeout: float) -> dict:
    """One launch of the trainer; returns the collected record (module docstring)."""
    from bench.scaling import launch, run_args, train_records, write_ds_config

    run_dir = work / config.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    ds = write_ds_config(run_dir / "ds_in.json", ds_config, micro_batch)
    sets = ["normalizers=null", 'data.val_manifest=""', f"log.profile_steps=[{profile[0]},{profile[1]}]", *extra_sets]
    args = argparse.Namespace(steps=steps, log_every=log_every, data=str(data), config=str(config), set=sets)
    started = time.time()
    wall = launch(1, run_args(args, run_dir, ds), run_dir / "log.txt", timeout)
    startup = json.loads((run_dir / "startup.json").read_text())
    startup["tool_to_process_s"] = round(startup["process_start_epoch"] - started, 3)
    table = json.loads((run_dir / "profile_rank0.json").read_text())
    records = train_records(run_dir)
    return {"run": config.stem, "wall_s": wall, "startup": startup, "profile": table, "intervals": records}


def summary(rec: dict) -> str:
    """Short text: the categories by time, the host figures and the start-up phases."""
    t, s = rec["profile"], rec["startup"]
    lines = [f"{rec['run']}: steps {t['first_step']}-{t['last_step']}, {t['wall_ms_per_step']:.1f} ms wall per step "
             f"(profiler on), {t['unit']} {sum(t['ms_per_step'].values()):.1f} ms per step"]
    for cat, ms in sorted(t["ms_per_step"].items(), key=lambda x: -x[1]):
        if ms > 0:
            lines.append(f"  {cat:<22} {ms:8.2f} ms  {100 * t['share'][cat]:5.1f} %")
    h = t["host"]
    lines.append(f"  device busy {h['device_busy_ms_per_step']} ms/step, idle {h['device_idle_ms_per_step']} ms/step; "
                 f"syncs per step {h['syncs_per_step_by_phase']}")
    lines.append("  start-up: " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "process_start_epoch"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="configs/train/<name>.yaml names, or YAML paths")
    p.add_argument("--data", type=Path, required=True, help="dataset root with train/manifest.json")
    p.add_argument("--ds_config", type=Path, default=ROOT / "ds_configs" / "zero0_bf16.json")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--profile", type=int, nargs=2, default=(56, 58), metavar=("FIRST", "LAST"))
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to eqv2/train.py")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "step_profile")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    p.add_argument("--out-dir", type=Path, required=True, help="one <run>.json per run config")
    args = p.parse_args(argv)
    configs = []
    for name in args.runs:
        path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "configs" / "train" / f"{name}.yaml"
        if not path.is_file():
            p.error(f"--runs {name}: no such run config {path}")
        configs.append(path)
    if not (args.data / "train" / "manifest.json").is_file():
        p.error(f"--data {args.data}: no train/manifest.json (make it with bench/make_oc20_sized_data.py)")
    if not 1 <= args.profile[0] <= args.profile[1] <= args.steps:
        p.error(f"--profile {args.profile}: must be steps within 1..--steps ({args.steps})")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    code = 0
    for path in configs:
        try:
            rec = profile_run(path, args.data, args.ds_config, args.work, args.steps, tuple(args.profile),
                              args.micro_batch, args.log_every, args.set, args.timeout)
        except RuntimeError as err:  # one failing config must not lose the others
            print(f"step_profile: {path.stem}: {err}", file=sys.stderr, flush=True)
            code = 1
            continue
        (args.out_dir / f"{path.stem}.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(summary(rec), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
