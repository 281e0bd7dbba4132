#!/usr/bin/env python
"""Convert a fairchem/OCP EquiformerV2 checkpoint (legacy or backbone+heads layout) to an eqv2 model
checkpoint readable by `eqv2.load_model`, the ASE calculator and `python -m eqv2.predict`.

    python tools/convert_fairchem_checkpoint.py eq2_153M_ec4_allmd.pt eqv2_153M_allmd.pt

Hyperparameters come from the checkpoint's own config; target normalisers from its `normalizers`
or dataset config (or the --energy-* / --forces-std flags).  By default the EMA weights are used
when present, as fairchem evaluates with them.  docs/fairchem.md lists what converts; the rest is refused
with an error naming the model, head or option.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqv2.checkpoint import Normalizers, save_model  # noqa: E402
from eqv2.normalizers import StressNormalizers  # noqa: E402
from eqv2.fairchem_compat import convert_checkpoint  # noqa: E402
from eqv2.model.equiformer_v2 import EquiformerV2, count_parameters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="fairchem checkpoint (.pt)")
    parser.add_argument("output", type=Path, help="eqv2 model checkpoint to write")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    parser.add_argument("--energy-mean", type=float, help="override the energy normaliser mean (eV)")
    parser.add_argument("--energy-std", type=float, help="override the energy normaliser std (eV)")
    parser.add_argument("--forces-std", type=float, help="override the force normaliser std (eV/Å)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects (only for checkpoints from a trusted source)")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"input checkpoint not found: {args.input}")
    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=not args.trust_pickle)
    except Exception as err:
        hint = "" if args.trust_pickle else " (if it comes from a trusted source, retry with --trust-pickle)"
        print(f"error: cannot read {args.input}: {err}{hint}", file=sys.stderr)
        return 2
    try:
        converted = convert_checkpoint(checkpoint, weights=args.weights)
    except ValueError as err:
        print(f"error: {args.input}: {err}", file=sys.stderr)
        return 2
    cfg, norms, notes = converted.config, converted.normalizers, converted.notes
    overrides = {"energy_mean": args.energy_mean, "energy_std": args.energy_std, "forces_std": args.forces_std}
    if norms is None and any(v is None for v in overrides.values()):
        print(f"error: {args.input}: no target normalisers in the checkpoint; pass --energy-mean, --energy-std "
              "and --forces-std", file=sys.stderr)
        return 2
    norms = {**(norms or {}), **{k: v for k, v in overrides.items() if v is not None}}
    stress = norms.pop("stress", None) or {}  # as fairchem, a stress part without a normaliser is not rescaled
    model = EquiformerV2(cfg)
    model.load_state_dict(converted.state_dict)
    meta = {"source": str(args.input), "converted_from": "fairchem", **notes,
            "step": int(checkpoint.get("step", -1) or -1)}
    # the legacy model's references are in units of the energy std fairchem denormalises with (--energy-std too)
    references = converted.energy_references(norms["energy_std"])
    normalizers = Normalizers(**norms, stress=StressNormalizers(**stress) if cfg.stress_head is not None else None)
    save_model(args.output, model, cfg, normalizers, meta=meta, energy_references=references)
    refs = "" if references is None else f", energy references for {sum(v != 0 for v in references)} elements"
    heads = "energy" + (", forces" if cfg.regress_forces else "") + (", stress" if cfg.stress_head else "")
    print(f"wrote {args.output}: {cfg.num_layers} blocks, L{cfg.lmax} M{cfg.mmax}, heads {heads}, "
          f"{count_parameters(model):,} parameters, {notes['weights']} weights, normalisers {norms}{refs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
