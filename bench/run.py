#!/usr/bin/env python
"""The current benchmark table: the full trainer per published run config, fairchem in the same run.

For each run config (`configs/train/<name>.yaml`) this runs, on one GPU of this machine:

1. **eqv2's trainer end to end**: `bench/scaling.py --ranks 1` launches `eqv2/train.py` with the run
   config as published (its model, kernels, compilation, shape buckets, memory budget) on OC20-sized
   shards (`bench/make_oc20_sized_data.py`), `--steps` optimizer steps at `--micro-batch` structures.
   *End to end* is steps × micro-batch over the launch's wall time (start-up, compilation and CUDA-graph
   recordings included); *steady* is the mean over the logging intervals after `--skip` steps in which
   no shape bucket, compilation or recording happened.
2. **fairchem-core 1.10.0** (the reference): `bench/model.py --reference` times its EquiformerV2 of the
   same architecture on OC20-like batches of the same size in one process (fp16 AMP with a GradScaler,
   graph built in its forward pass, as its OC20 configs train). That is its training step alone, without
   data loading, EMA or logging, which favours fairchem in the ratio.

The table (model, GPU, commit, both trainers' figures, the ratio steady / fairchem) goes to stdout and,
with `--write`, replaces the block between the `bench:current` markers at the top of BENCHMARKS.md.

    python -m bench.make_oc20_sized_data --out /tmp/oc20 --train 4000 --val 64 --workers 16
    python -m bench.run --runs oc20_all_md_153M oc20_all_md_31M --data /tmp/oc20 --steps 300 --skip 100 \
        --json bench.json --write BENCHMARKS.md
    # split over two calls of a time-limited machine: the second adds the first's rows
    python -m bench.run --runs oc20_all_md_153M --data /tmp/oc20 --json a.json
    python -m bench.run --runs oc20_all_md_31M --data /tmp/oc20 --merge a.json --write BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:current -->", "<!-- /bench:current -->"


def model_name(run_config: Path) -> str:
    """The model YAML a run config builds on, as bench/model.py names it (`eqv2_<name>.yaml` → name)."""
    model = yaml.safe_load(run_config.read_text()).get("model")
    base = model.get("base") if isinstance(model, dict) else model
    if not isinstance(base, str) or not Path(base).name.startswith("eqv2_"):
        raise SystemExit(f"{run_config}: model must name a configs/model/eqv2_<name>.yaml (as base), got {base!r}")
    return Path(base).stem.removeprefix("eqv2_")


def run(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {log}:\n{tail}")


def trainer(args, name: str, work: Path) -> dict:
    out = work / f"{name}_trainer.json"
    cmd = [sys.executable, "-m", "bench.scaling", "--ranks", "1", "--ds_config", args.ds_config,
           "--config", f"configs/train/{name}.yaml", "--data", args.data, "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps), "--skip", str(args.skip), "--log-every", str(args.log_every),
           "--work", str(work / name), "--timeout", str(args.timeout), "--out", str(out),
           "--set", "normalizers=null", "--set", 'data.val_manifest=""']
    run(cmd, work / f"{name}_trainer.log", args.timeout + 60)
    row = json.loads(out.read_text())["weak_scaling"][0]
    row["end_to_end_samples_per_s"] = args.steps * args.micro_batch / row["wall_s"]
    return row


def reference(args, model: str, work: Path) -> dict:
    out = work / f"{model}_fairchem.json"
    cmd = [sys.executable, "-m", "bench.model", "--configs", model, "--batch-sizes", str(args.micro_batch),
           "--steps", str(args.reference_steps), "--warmup", "4", "--impls", "--reference", "--json", str(out)]
    run(cmd, work / f"{model}_fairchem.log", args.timeout)
    result = json.loads(out.read_text())["results"][0]
    row = result["fairchem-1.10.0"]
    if "error" in row:
        raise RuntimeError(f"fairchem {model}: {row['error']}")
    # FLOPs of the architecture (eqv2's eager step, counted by bench/model.py on the first batch)
    row["tflop_per_atom"] = result["eqv2_tflop_per_atom"]
    row["mfu"] = row["atoms_per_s"] * row["tflop_per_atom"] * 1e12 / (PEAK_TFLOPS * 1e12)
    return row


PEAK_TFLOPS = 989.0  # H200 (and H100 SXM) dense bf16 peak: MFU = FLOP/s of the model's FLOPs / this


def trainer_mfu(t: dict, f: dict | None) -> float | None:
    """MFU of the trainer's steady rate: steady samples/s x its atoms per sample x the architecture's
    FLOPs per atom (from the reference call's FLOP count) over the bf16 dense peak."""
    steady = t.get("steady_samples_per_s_per_rank")
    if not (f and steady and t.get("samples_per_s")):
        return None
    atoms_per_sample = t["atoms_per_s"] / t["samples_per_s"]
    return steady * atoms_per_sample * f["tflop_per_atom"] * 1e12 / (PEAK_TFLOPS * 1e12)


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows: list[dict], gpu: str, sha: str, args) -> str:
    lines = [f"Machine: {gpu}; commit {sha}; micro-batch {args.micro_batch}, {args.steps} steps "
             f"(steady: after {args.skip}), `{args.ds_config}`.",
             f"MFU against {PEAK_TFLOPS:.0f} TFLOP/s (bf16 dense), the architecture's FLOPs counted on eqv2's "
             "eager step for both trainers.",
             "", "| model | params | trainer end to end (samples/s) | trainer steady (samples/s) | trainer MFU "
             "| launch to first step (s) | trainer peak GiB "
             "| fairchem 1.10.0 step (samples/s) | fairchem MFU | fairchem peak GiB | steady / fairchem |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, f = r["trainer"], r.get("fairchem")
        steady = t.get("steady_samples_per_s_per_rank")
        ratio = f"{steady / f['samples_per_s']:.2f}×" if f and steady else "–"
        lines.append(f"| {r['run']} | {f['params'] / 1e6:.1f}M |" if f else f"| {r['run']} | – |")
        lines[-1] += (f" {t['end_to_end_samples_per_s']:.1f} | {steady:.1f} |" if steady else
                      f" {t['end_to_end_samples_per_s']:.1f} | – |")
        mfu = trainer_mfu(t, f)
        first = t.get("startup", {}).get("launch_to_first_step_s")
        lines[-1] += f" {100 * mfu:.1f} % |" if mfu is not None else " – |"
        lines[-1] += f" {first:.0f} |" if first is not None else " – |"
        lines[-1] += f" {t['peak_mem_gib_rank0']:.1f} |"
        lines[-1] += (f" {f['samples_per_s']:.1f} | {100 * f['mfu']:.1f} % | {f['peak_gib']:.1f} | {ratio} |" if f
                      else " – | – | – | – |")
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + new + rest.split(END, 1)[1]
    else:  # after the title line
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{new}\n{rest}"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["oc20_all_md_153M", "oc20_all_md_31M"], help="configs/train/<name>.yaml")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ (bench/make_oc20_sized_data.py)")
    p.add_argument("--ds_config", default="ds_configs/zero0_bf16.json")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=100, help="steps before the steady-state intervals")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--reference-steps", type=int, default=20, help="fairchem steps timed (0: no reference)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    p.add_argument("--json", type=Path, help="all results")
    p.add_argument("--write", type=Path, help="replace the current table in this file (BENCHMARKS.md)")
    p.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD; give it where the "
                                                  "tree was copied without .git)")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="--json files of earlier invocations on the same GPU and commit whose rows join the table "
                        "(to split the runs over calls with a time limit)")
    args = p.parse_args(argv)
    for name in args.runs:
        if not (ROOT / "configs" / "train" / f"{name}.yaml").is_file():
            p.error(f"--runs {name}: no configs/train/{name}.yaml")
    if not (Path(args.data) / "train" / "manifest.json").is_file():
        p.error(f"--data {args.data}: no train/manifest.json (make it with bench/make_oc20_sized_data.py)")
    import torch

    sha = args.commit or commit()

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.merge:
        earlier = json.loads(path.read_text())
        if (earlier["gpu"], earlier["commit"]) != (gpu, sha):
            p.error(f"--merge {path}: measured on {earlier['gpu']} at {earlier['commit']}, not {gpu} at {sha}")
        rows += earlier["rows"]
    for name in args.runs:
        model = model_name(ROOT / "configs" / "train" / f"{name}.yaml")
        row = {"run": name, "model": model, "trainer": trainer(args, name, args.work)}
        print(f"{name}: trainer {row['trainer']['end_to_end_samples_per_s']:.1f} samples/s end to end, "
              f"steady {row['trainer'].get('steady_samples_per_s_per_rank')}", flush=True)
        if args.reference_steps:
            row["fairchem"] = reference(args, model, args.work)
            print(f"{name}: fairchem {row['fairchem']['samples_per_s']:.1f} samples/s", flush=True)
        rows.append(row)
    block = table(rows, gpu, sha, args)
    print(block)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "commit": sha, "rows": rows}, indent=2))
    if args.write:
        write_block(args.write, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
