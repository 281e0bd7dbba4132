#!/usr/bin/env python
"""Check a launch's configs and stamp the resolved copies into the job's directory, before any rank starts.

Run by the batch scripts (`python -m slurm.resolve_config`, from the repository) with the trainer's own arguments.  It parses them with the trainer's parser and
loads both configs with the trainer's loaders, so a typo in a key, an override or a path fails here in
seconds with exit 2 (the trainer's "bad config" code, which the scripts never requeue) instead of
after N nodes have started.  Writes OUT/run_config.yaml (overrides applied, model inlined) and
OUT/ds_config.json, and prints the derived global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from eqv2.config import ConfigError, save_yaml
from eqv2.training.config import load_ds_config, load_run_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory for the stamped configs")
    p.add_argument("--world-size", type=int, required=True, help="ranks of the launch (for the global batch)")
    ours, trainer_argv = p.parse_known_args(argv)
    from eqv2.train import parse_args  # the trainer's parser: unknown trainer flags fail here too

    args = parse_args(trainer_argv)
    try:
        ds = load_ds_config(args.ds_config)
        cfg, _ = load_run_config(args.config, args.set, ds["train_micro_batch_size_per_gpu"])
    except (ConfigError, ValueError) as err:
        print(f"resolve_config: config error: {err}", file=sys.stderr)
        return 2
    out = Path(ours.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "run_config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
    (out / "command.txt").write_text(" ".join(["eqv2/train.py", *trainer_argv]) + "\n")
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    print(f"resolve_config: {args.config} + {args.ds_config} -> {os.path.relpath(out)}; global batch "
          f"{micro * gas * ours.world_size} = {micro} x {gas} x {ours.world_size} ranks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
