"""Diagnostic (issue 26 precision): per family and frame, the float32 relative errors of E, F and stress of a
converted OMat24-family test model (tests/model/test_fairchem_stress.py) against fairchem-core 1.10.0 on its
own graph, eqv2 batched as `eqv2 predict` batches (all frames at once) and one frame at a time as the ASE
calculator does.

    python -m diagnostics.fairchem_f32_errors [case ...]     (default: every case of the test)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

NAMES = ["bulk Cu strained rattled", "bulk ZnO strained rattled", "bulk NaCl ideal (ties)",
         "slab Pt(111) ideal", "slab Cu(100)+CO rattled"]


def main(cases: list[str]) -> None:
    import tests.model.test_fairchem_stress as T
    from eqv2.calculator import EquiformerV2Calculator
    from eqv2.checkpoint import load_model
    from eqv2.predict import predict

    worst_all = {}
    for case in cases or list(T.CASES):
        checkpoint, reference = T.fairchem_model(case)
        tmp = Path(tempfile.mkdtemp())
        dst = T.convert(checkpoint, tmp)
        _, structures = T.frames(tmp)
        energy, forces, stress = predict(load_model(str(dst), "cpu").eval(), structures, torch.device("cpu"))
        calc = EquiformerV2Calculator(str(dst), device="cpu")
        start = 0
        for i, atoms in enumerate(structures):
            e, f, s = reference(atoms)
            s = s.reshape(3, 3)
            batched = (T.rel_err(energy[i:i + 1], e.reshape(-1)), T.rel_err(forces[start:start + len(atoms)], f),
                       T.rel_err(stress[i], s))
            start += len(atoms)
            atoms.calc = calc
            single = (T.rel_err([atoms.get_potential_energy()], e.reshape(-1)), T.rel_err(atoms.get_forces(), f),
                      T.rel_err(atoms.get_stress(voigt=False), s))
            worst = [max(a, b) for a, b in zip(batched, single)]
            worst_all[case] = [max(a, b) for a, b in zip(worst_all.get(case, [0, 0, 0]), worst)]
            print(f"{case:34s} {NAMES[i]:26s} E {worst[0]:.1e}  F {worst[1]:.1e}  S {worst[2]:.1e}", flush=True)
    for case, (e, f, s) in worst_all.items():
        print(f"worst {case:28s} E {e:.1e}  F {f:.1e}  S {s:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
