"""IS2RE and IS2RS metrics of relaxation results, as OC20 defines them (Chanussot et al. 2021, Sec. 4).

- IS2RE energy MAE: mean |E_relaxed,pred - E_relaxed,DFT| over structures; EwT: the fraction with that
  error below 0.02 eV (the S2EF EwT energy threshold, `eqv2.training.metrics.ENERGY_THRESHOLD`).
- IS2RS ADwT: for each structure the mean over free atoms of the minimum-image distance between
  predicted and DFT-relaxed positions; the fraction of structures below a threshold t, averaged over
  t = 0.01, 0.011, ..., 0.499 Å (fairchem's evaluator's grid).
- IS2RS AFbT: the relaxed structures are given to a reference calculator (DFT in OC20; any ASE
  calculator here, `--oracle module:Class`); a structure's largest force norm over free atoms below
  t counts, averaged over t = 0.01, 0.011, ..., 0.399 eV/Å; FbT at 0.05 eV/Å beside it.
"""
from __future__ import annotations

import importlib

import numpy as np

from eqv2.relaxation.engine import Result
from eqv2.training.metrics import ENERGY_THRESHOLD

ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)  # Å
AFBT_THRESHOLDS = np.arange(0.01, 0.4, 0.001)  # eV/Å
FBT_THRESHOLD = 0.05  # eV/Å


def min_image_displacement(a: np.ndarray, b: np.ndarray, cell: np.ndarray, pbc) -> np.ndarray:
    """[n, 3] displacements a - b, each periodic direction wrapped to its nearest image."""
    frac = np.linalg.solve(np.asarray(cell, np.float64).T, (a - b).T).T
    periodic = np.asarray(pbc, bool)
    frac[:, periodic] -= np.round(frac[:, periodic])
    return frac @ np.asarray(cell, np.float64)


def mean_free_distance(r: Result) -> float:
    s = r.structure
    d = np.linalg.norm(min_image_displacement(r.positions, s.target_positions, s.cell, s.pbc), axis=1)
    free = ~np.asarray(s.fixed, bool)
    return float(d[free].mean()) if free.any() else 0.0


def fraction_below_averaged(values: np.ndarray, thresholds: np.ndarray) -> float:
    return float((np.asarray(values)[None, :] < thresholds[:, None]).mean()) if len(values) else float("nan")


def is2re_metrics(results: list[Result]) -> dict[str, float]:
    with_target = [r for r in results if r.structure.target_energy is not None]
    err = np.array([abs(r.energy - r.structure.target_energy) for r in with_target])
    out = {"num_structures": len(with_target)}
    if with_target:
        out.update(energy_mae=float(err.mean()), energy_within_threshold=float((err < ENERGY_THRESHOLD).mean()))
        init = [r for r in with_target if r.structure.initial_energy is not None]
        if init:  # the baseline: the initial structure's energy as the relaxed energy
            base = np.array([abs(r.structure.initial_energy - r.structure.target_energy) for r in init])
            out["energy_mae_initial_baseline"] = float(base.mean())
    return out


def is2rs_metrics(results: list[Result]) -> dict[str, float]:
    with_target = [r for r in results if r.structure.target_positions is not None]
    out = {"num_structures": len(with_target)}
    if with_target:
        dist = np.array([mean_free_distance(r) for r in with_target])
        base = np.array([mean_free_distance(Result(r.structure, r.structure.positions, 0.0, 0.0, 0, False))
                         for r in with_target])
        out.update(average_distance_within_threshold=fraction_below_averaged(dist, ADWT_THRESHOLDS),
                   mean_free_distance=float(dist.mean()),
                   average_distance_within_threshold_initial_baseline=fraction_below_averaged(base, ADWT_THRESHOLDS))
    return out


def load_oracle(spec: str):
    """An ASE calculator from 'module:Class' (constructed without arguments), e.g. ase.calculators.emt:EMT."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--oracle {spec!r}: want module:Class, e.g. ase.calculators.emt:EMT")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--oracle {spec!r}: cannot import {name} from {module} ({err})") from err
    return cls()


def oracle_max_forces(results: list[Result], calculator) -> np.ndarray:
    """[S] largest force norm over free atoms of each relaxed structure, by the reference calculator."""
    from ase import Atoms

    out = []
    for r in results:
        s = r.structure
        atoms = Atoms(numbers=s.numbers, positions=r.positions, cell=s.cell, pbc=s.pbc)
        atoms.calc = calculator
        f = np.linalg.norm(atoms.get_forces(), axis=1)[~np.asarray(s.fixed, bool)]
        out.append(float(f.max()) if f.size else 0.0)
    return np.array(out)


def afbt_metrics(results: list[Result], calculator) -> dict[str, float]:
    fmax = oracle_max_forces(results, calculator)
    return {"average_forces_below_threshold": fraction_below_averaged(fmax, AFBT_THRESHOLDS),
            "forces_below_threshold_0.05": float((fmax < FBT_THRESHOLD).mean()) if len(fmax) else float("nan"),
            "num_structures": len(results)}
