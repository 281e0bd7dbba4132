"""Convert a fairchem/OCP EquiformerV2 checkpoint (legacy or backbone+heads layout) to an eqv2 model
file readable by `eqv2.load_model`, the ASE calculator, `eqv2 predict` and `eqv2 evaluate`.

Hyperparameters come from the checkpoint's own config; target normalisers from its `normalizers`
or dataset config (or the --energy-* / --forces-std flags).  By default the EMA weights are used
when present, as fairchem evaluates with them.  docs/fairchem.md lists what converts; the rest is refused
with an error naming the model, head or option.
"""
from __future__ import annotations

from pathlib import Path

from eqv2.tools.common import fail, parser

EXAMPLES = [
    "eqv2 convert eq2_153M_ec4_allmd.pt eqv2_153M_allmd.pt",
    "eqv2 convert my_finetune.pt mine.pt --weights raw --energy-mean -0.7 --energy-std 2.3 --forces-std 0.08",
]


def main(argv: list[str] | None = None) -> int:
    p = parser("convert", __doc__, EXAMPLES)
    p.add_argument("input", type=Path, help="fairchem checkpoint (.pt)")
    p.add_argument("output", type=Path, help="eqv2 model checkpoint to write")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (default) or raw weights")
    p.add_argument("--energy-mean", type=float, help="override the energy normaliser mean (eV)")
    p.add_argument("--energy-std", type=float, help="override the energy normaliser std (eV)")
    p.add_argument("--forces-std", type=float, help="override the force normaliser std (eV/Å)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects (only for checkpoints from a trusted source)")
    args = p.parse_args(argv)
    if not args.input.is_file():
        return fail("convert", f"input checkpoint not found: {args.input}")
    for flag in ("energy_std", "forces_std"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    import torch

    from eqv2.checkpoint import Normalizers, save_model
    from eqv2.fairchem_compat import convert_checkpoint
    from eqv2.normalizers import StressNormalizers
    from eqv2.model.equiformer_v2 import EquiformerV2, count_parameters

    try:
        checkpoint = torch.load(args.input, map_location="cpu", weights_only=not args.trust_pickle)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a file it cannot read
        hint = "" if args.trust_pickle else " (if it comes from a trusted source, retry with --trust-pickle)"
        return fail("convert", f"cannot read {args.input}: {str(err).splitlines()[0]}{hint}")
    try:
        converted = convert_checkpoint(checkpoint, weights=args.weights)
    except ValueError as err:
        return fail("convert", f"{args.input}: {err}")
    cfg, norms, notes = converted.config, converted.normalizers, converted.notes
    overrides = {"energy_mean": args.energy_mean, "energy_std": args.energy_std, "forces_std": args.forces_std}
    if norms is None and any(v is None for v in overrides.values()):
        return fail("convert", f"{args.input}: no target normalisers in the checkpoint; pass --energy-mean, "
                    "--energy-std and --forces-std")
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
