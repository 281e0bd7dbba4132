"""Predict energies and forces for every frame of any ASE-readable file.

    python -m eqv2.predict --checkpoint model.pt --input frames.extxyz --output out.npz

The .npz holds `energy` [n_structures] (eV), `forces` [total_atoms, 3] (eV/Å, frames
concatenated in order), `natoms` [n_structures], and for models with a stress output `stress`
[n_structures, 3, 3] (eV/Å^3, ASE's sign convention).  Structures are batched by an atom budget.
On CUDA the model runs the fast path by default (eqv2/inference.py: bf16, fused kernels, compiled), its first
batch checked against float32 (a line on stderr; outside the tolerance it falls back to float32);
--precision fp32 runs the float32 reference path.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from eqv2.calculator import atoms_to_batch, default_device
from eqv2.inference import add_arguments, load_for_inference, options_from_args
from eqv2.tools.common import add_quiet, fail
from eqv2.tools.common import parser as cli_parser


def read_frames(path: Path):
    import ase.io

    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:
        raise ValueError(f"{path}: cannot read structures with ASE ({err})") from err
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path}: contains no structures")
    return frames


def predict(potential, frames, device, max_atoms: int = 2000, quiet: bool = True):
    """(energies [n], forces [total_atoms, 3] or None, stress [n, 3, 3] or None) of `frames`, batched by
    an atom budget; a progress bar over the structures unless `quiet`."""
    from eqv2.tools.common import show_progress
    from tqdm import tqdm

    energies, forces, stresses = [], [], []
    start = 0
    bar = tqdm(total=len(frames), unit="structure", desc="predict", disable=show_progress(quiet))
    while start < len(frames):
        stop, atoms = start, 0
        while stop < len(frames) and (stop == start or atoms + len(frames[stop]) <= max_atoms):
            atoms += len(frames[stop])
            stop += 1
        batch = atoms_to_batch(frames[start:stop], ids=[f"frame {i}" for i in range(start, stop)]).to(device)
        with torch.no_grad():
            out = potential(batch)
        energies.append(out["energy"].double().cpu().numpy())
        if "forces" in out:
            forces.append(out["forces"].double().cpu().numpy())
        if "stress" in out:
            stresses.append(out["stress"].double().cpu().numpy())
        bar.update(stop - start)
        start = stop
    bar.close()
    return (np.concatenate(energies), (np.concatenate(forces) if forces else None),
            (np.concatenate(stresses) if stresses else None))


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("predict", __doc__, [
        "eqv2 predict --checkpoint model.pt --input frames.extxyz --output out.npz",
        "eqv2 predict --checkpoint model.pt --input relax.traj --output relax.npz --device cpu --max-atoms 500",
        "eqv2 predict --checkpoint model.pt --input frames.extxyz --output out.npz --precision fp32   # reference path",
        "eqv2 predict --checkpoint model.pt --input frames.extxyz --output out.npz --check-precision 5"])
    parser.add_argument("--checkpoint", required=True, type=Path, help="eqv2 model checkpoint")
    parser.add_argument("--input", required=True, type=Path, help="any ASE-readable file (all frames)")
    parser.add_argument("--output", required=True, type=Path, help=".npz to write")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--max-atoms", type=int, default=2000, help="atom budget per batch")
    add_arguments(parser)
    add_quiet(parser)
    args = parser.parse_args(argv)
    if args.max_atoms < 1:
        parser.error(f"--max-atoms must be >= 1, got {args.max_atoms}")
    device = torch.device(args.device) if args.device else default_device()
    try:
        potential = load_for_inference(args.checkpoint, device, options_from_args(args))
        if not args.quiet:
            print(potential.describe(), file=sys.stderr)
        frames = read_frames(args.input)
        energy, forces, stress = predict(potential, frames, device, args.max_atoms, args.quiet)
    except (FileNotFoundError, ValueError) as err:
        return fail("predict", str(err))
    natoms = np.array([len(f) for f in frames], dtype=np.int64)
    out = {"energy": energy, "natoms": natoms}
    if forces is not None:
        out["forces"] = forces
    if stress is not None:
        out["stress"] = stress
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **out)
    print(f"wrote {args.output}: {len(frames)} structures, {int(natoms.sum())} atoms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
