"""Export a training checkpoint as a plain eqv2 model file (for `eqv2.load_model`, the ASE calculator,
`eqv2 predict` and `eqv2 evaluate`).

The EMA weights are what the trainer evaluates, so they are the default.  Live weights come from the
fp32 master copy (ZeRO 1-3: gathered from the optimizer shards with DeepSpeed's zero_to_fp32; ZeRO-0:
the module state); buffers from the saved model states.  Runs on CPU, whatever the training world size.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from eqv2.tools.common import UserError, fail, parser

EXAMPLES = [
    "eqv2 export runs/demo/checkpoints -o demo.pt                          # latest, EMA weights",
    "eqv2 export runs/demo/checkpoints --best -o best.pt                   # best validation checkpoint",
    "eqv2 export runs/demo/checkpoints/step_00000800 --weights live -o live.pt",
]


def resolve_tag_dir(path: Path, best: bool) -> Path:
    """The step_* directory to export: the best validation one, or the newest complete one of `path`."""
    from eqv2.training import checkpointing as ckpt

    if best:
        info = path / "best.json"
        if not info.is_file():
            raise UserError(f"{info} not found (no validation ran, or checkpoint.save_best was off)")
        return path / json.loads(info.read_text())["tag"]
    try:
        found, warnings = ckpt.find_resume(str(path), path)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        raise UserError(str(err).removeprefix("--resume ")) from None
    for warning in warnings:
        print(f"eqv2 export: warning: {warning}", file=sys.stderr)
    return found


def export(tag_dir: Path, out: Path, weights: str) -> dict:
    """Write the model of run checkpoint `tag_dir` (its config, normalisers and `weights`) to `out`."""
    from eqv2.checkpoint import Normalizers, save_model
    from eqv2.config import from_dict
    from eqv2.execution import paper_config
    from eqv2.model.config import ModelConfig
    from eqv2.model.equiformer_v2 import EquiformerV2
    from eqv2.training import checkpointing as ckpt

    try:
        state, sd = ckpt.run_weights(tag_dir, weights)
    except ckpt.CheckpointError as err:
        raise UserError(str(err)) from None
    # a run from before the execution plan saved kernel and padding keys with its model: dropped
    model_cfg = from_dict(ModelConfig, paper_config(state["config"]["model"]), prefix="model")
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
    p = parser("export", __doc__, EXAMPLES)
    p.add_argument("checkpoint", type=Path, help="a run's checkpoints/ directory or one step_* tag directory")
    p.add_argument("-o", "--out", type=Path, required=True, help="output model file (.pt)")
    p.add_argument("--weights", choices=["ema", "live"], default="ema")
    p.add_argument("--best", action="store_true", help="the best validation checkpoint instead of the latest")
    args = p.parse_args(argv)
    try:
        tag_dir = resolve_tag_dir(args.checkpoint, args.best)
        meta = export(tag_dir, args.out, args.weights)
    except UserError as err:
        return fail("export", str(err))
    print(f"eqv2 export: wrote {args.out} ({meta['weights']} weights of {tag_dir}, step {meta['step']})")
    print(f"next: eqv2 evaluate --checkpoint {args.out} --split val=VAL/manifest.json, "
          f"or eqv2 predict --checkpoint {args.out} --input structures.extxyz --output pred.npz")
    return 0
