#!/usr/bin/env python
"""1B L8 under ZeRO-3 on one GPU: the trainer eager vs with compiled blocks (issue 25), a short measurement.

Runs `deepspeed --num_gpus 1 eqv2/train.py` with configs/train/oc20_all_md_1B_L8.yaml and
ds_configs/zero3_bf16.json on OC20-sized shards (bench/make_oc20_sized_data.py), once with
compile.enabled=false and once with true, each `--steps` steps under a wall-clock limit, and writes
{mode: {samples_per_s per logging interval, peak_mem_gib, wall_s, rc, tail}} as JSON to --json.

    python -m bench.make_oc20_sized_data --out /tmp/oc20 --train 400 --val 16 --workers 16
    python -m bench.zero3_compile --data /tmp/oc20 --steps 20 --json $OUT/zero3_compile.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, args) -> dict:
    run_dir = args.work / mode
    sets = {"run_dir": run_dir, "data.train_manifest": args.data / "train" / "manifest.json",
            "data.val_manifest": args.data / "val" / "manifest.json", "optim.max_steps": args.steps,
            "optim.max_epochs": "null", "optim.warmup_epochs": "null", "optim.warmup_steps": 2,
            "log.every_steps": args.log_every, "eval.every_steps": 10**6, "eval.max_batches": 1,
            "checkpoint.every_steps": 10**6, "checkpoint.save_at_end": "false",
            "compile.enabled": "true" if mode == "compiled" else "false"}
    cmd = ["deepspeed", "--num_gpus", "1", str(ROOT / "eqv2" / "train.py"), "--ds_config",
           str(ROOT / "ds_configs" / "zero3_bf16.json"), "--config", str(ROOT / "configs/train/oc20_all_md_1B_L8.yaml")]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    env = {**os.environ, "PYTHONPATH": path, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout stops the ranks too
    try:
        out, _ = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        rc = "timeout"
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "split" not in r and "samples_per_s" in r]
    return {"rc": rc, "wall_s": time.time() - t0,
            "intervals": [{k: r.get(k) for k in ("step", "samples_per_s", "peak_mem_gib", "compiles", "compile_s")}
                          for r in train],
            "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in train), default=None),
            "tail": out[-3000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--timeout", type=float, default=150, help="seconds per launch")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    p.add_argument("--work", type=Path, default=Path("/tmp/zero3_compile"))
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    results = {}
    for mode in args.modes:
        results[mode] = run(mode, args)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(mode, {k: v for k, v in results[mode].items() if k != "tail"}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
