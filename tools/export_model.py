#!/usr/bin/env python
"""Export a training checkpoint as a plain eqv2 model checkpoint (for `eqv2.load_model` / ASE).

    python tools/export_model.py runs/demo/checkpoints            -o demo.pt   # latest, EMA weights
    python tools/export_model.py runs/demo/checkpoints --best     -o best.pt   # best validation checkpoint
    python tools/export_model.py runs/demo/checkpoints/step_00000800 --weights live -o live.pt

The EMA weights are what the trainer evaluates, so they are the default.  Live weights come from the
fp32 master copy (ZeRO 1-3: gathered from the optimizer shards with DeepSpeed's zero_to_fp32; ZeRO-0:
the module state); buffers from the saved model states.  Runs on CPU, whatever the training world size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.checkpoint import Normalizers, save_model  # noqa: E402
from eqv2.config import from_dict  # noqa: E402
from eqv2.model.config import ModelConfig  # noqa: E402
from eqv2.model.equiformer_v2 import EquiformerV2  # noqa: E402
from eqv2.training import checkpointing as ckpt  # noqa: E402


def resolve_tag_dir(path: Path, best: bool) -> Path:
    if best:
        info = path / "best.json"
        if not info.is_file():
            raise SystemExit(f"export_model: {info} not found (no validation ran, or checkpoint.save_best was off)")
        return path / json.loads(info.read_text())["tag"]
    try:
        found, warnings = ckpt.find_resume(str(path), path)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        _fail(str(err).removeprefix("--resume "))
    for warning in warnings:
        print(f"export_model: warning: {warning}", file=sys.stderr)
    return found


def _fail(message: str):
    """A bad checkpoint argument: one line and exit status 2, as every tool."""
    print(f"export_model: {message}", file=sys.stderr)
    raise SystemExit(2)


def export(tag_dir: Path, out: Path, weights: str) -> dict:
    try:
        state, sd = ckpt.run_weights(tag_dir, weights)
    except ckpt.CheckpointError as err:
        _fail(str(err))
    model_cfg = from_dict(ModelConfig, state["config"]["model"], prefix="model")
    model = EquiformerV2(model_cfg)
    model.load_state_dict(sd, strict=True)  # checks that names and shapes match the config
    normalizers = Normalizers.from_mapping(state["normalizers"])  # older run checkpoints: force_rms
    # the energy target the run fitted (eqv2/training/targets.py): with fitted references the model file
    # carries them and predicts total energies
    meta = {"source": str(tag_dir), "step": state["step"], "weights": weights,
            "energy_target": state.get("energy_target", "as_stored"), "forces": model_cfg.forces}
    save_model(out, model, model_cfg, normalizers, meta=meta, energy_references=state.get("energy_references"))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a run's checkpoints/ directory or one step_* tag directory")
    p.add_argument("-o", "--out", type=Path, required=True, help="output model file (.pt)")
    p.add_argument("--weights", choices=["ema", "live"], default="ema")
    p.add_argument("--best", action="store_true", help="the best validation checkpoint instead of the latest")
    args = p.parse_args(argv)
    tag_dir = resolve_tag_dir(args.checkpoint, args.best)
    meta = export(tag_dir, args.out, args.weights)
    print(f"export_model: wrote {args.out} ({meta['weights']} weights of {tag_dir}, step {meta['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
