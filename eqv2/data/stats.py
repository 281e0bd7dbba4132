"""Per-sample summaries, per-shard partial sums and the dataset stats the model and trainer need.

The normalisers (energy mean/std, force RMS) and the model's averages (atoms per structure,
neighbours per atom) are accumulated per shard while shards are written, so a resumed or
parallel sharding run combines them exactly without rereading data.

forces_std = sqrt(mean of F_x^2, F_y^2, F_z^2 over every atom): the scale of one force component, about
a mean of zero (fairchem's name and definition of the force normaliser; older files call it force_rms).
avg_degree = mean number of neighbours per atom of the radius graph the model builds
(`eqv2.model.graph.radius_graph_pbc`), measured on a deterministic subset of structures (those whose
key hashes to 0 modulo `degree_every`) with a given cutoff and neighbour limit: by default the
paper's 12 Å / 20 neighbours; a model with another graph needs the stats measured on its own
(eqv2 stats --max-radius --max-neighbors), and stats.json records which graph
(`degree_graph`) so that the trainer can refuse a mismatch.

Per-element reference energies (`energy_references`, eV by atomic number; fairchem's element references,
MACE's E0s): the least-squares fit E_s ~ sum over the atoms of s of ref[Z], without intercept, over the
structures with an energy.  Each shard keeps the normal equations' sums (element-count products C^T C,
C^T E and the element counts), so the fit, and the mean and std of the residual energies
E_s - sum ref[Z] that a run with `data.energy_target: fitted_references` normalises by, combine
exactly over shards.  Elements that always occur in the same proportion cannot be told apart: the fit
is then the minimum-norm solution (predicted energies are the same for any split).
"""
from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DEGREE_RADIUS = 12.0
DEGREE_MAX_NEIGHBORS = 20
DEGREE_GRAPH = (DEGREE_RADIUS, DEGREE_MAX_NEIGHBORS)  # (max_radius Å, max_neighbors) of the paper's models


@dataclass
class Summary:
    natoms: int
    energy: float | None  # training target energy
    force_sq: float  # sum of squared force components
    force_n: int  # number of force components
    degree_edges: int  # radius-graph edges (0 unless selected for the degree estimate)
    degree_atoms: int
    elements: dict[int, int] | None = None  # atoms per atomic number (structures with an energy)


def neighbour_edges(sample: dict, max_radius: float = DEGREE_RADIUS, max_neighbors: int = DEGREE_MAX_NEIGHBORS) -> int:
    """Number of edges of the model's radius graph for one structure."""
    from eqv2.model.graph import radius_graph_pbc

    pos = torch.tensor(np.asarray(sample["positions"], dtype=np.float32))  # copy: sample arrays are read-only views
    graph = radius_graph_pbc(
        pos,
        torch.as_tensor(np.asarray(sample["cell"], dtype=np.float32)).reshape(1, 3, 3),
        torch.as_tensor(np.asarray(sample["pbc"], dtype=bool)).reshape(1, 3),
        torch.as_tensor([pos.shape[0]]),
        max_radius,
        max_neighbors,
    )
    return int(graph.edge_index.shape[1])


def summarize(sample: dict, key: str, degree_every: int,
              degree_graph: tuple[float, int] = DEGREE_GRAPH) -> Summary:
    n = len(sample["numbers"])
    forces = sample.get("forces")
    f = np.asarray(forces, dtype=np.float64) if forces is not None else np.zeros((0, 3))
    selected = degree_every > 0 and zlib.crc32(key.encode()) % degree_every == 0
    return Summary(
        natoms=n,
        energy=float(sample["energy"]) if sample.get("energy") is not None else None,
        force_sq=float(np.sum(f * f)),
        force_n=int(f.size),
        degree_edges=neighbour_edges(sample, *degree_graph) if selected else 0,
        degree_atoms=n if selected else 0,
        elements=dict(Counter(int(z) for z in np.asarray(sample["numbers"])))
        if sample.get("energy") is not None else None,
    )


class Accumulator:
    """Exact, order-independent-in-merging sums for one shard (Chan's parallel variance)."""

    def __init__(self) -> None:
        self.count = 0
        self.atoms = 0
        self.max_natoms = 0
        self.n_energy = 0
        self.energy_mean = 0.0
        self.energy_m2 = 0.0
        self.force_sq = 0.0
        self.force_n = 0
        self.degree_edges = 0
        self.degree_atoms = 0
        # normal equations of the element-reference fit: "a,b" (a <= b) -> sum of count_a * count_b,
        # "z" -> sum of count_z * energy, "z" -> sum of count_z (JSON keys)
        self.element_gram: dict[str, float] = {}
        self.element_energy: dict[str, float] = {}
        self.element_atoms: dict[str, int] = {}

    def add(self, s: Summary) -> None:
        self.count += 1
        self.atoms += s.natoms
        self.max_natoms = max(self.max_natoms, s.natoms)
        if s.energy is not None:
            self.n_energy += 1
            delta = s.energy - self.energy_mean
            self.energy_mean += delta / self.n_energy
            self.energy_m2 += delta * (s.energy - self.energy_mean)
        self.force_sq += s.force_sq
        self.force_n += s.force_n
        self.degree_edges += s.degree_edges
        self.degree_atoms += s.degree_atoms
        if s.energy is not None and s.elements is not None:
            items = sorted(s.elements.items())
            for i, (a, na) in enumerate(items):
                key = str(a)
                self.element_energy[key] = self.element_energy.get(key, 0.0) + na * s.energy
                self.element_atoms[key] = self.element_atoms.get(key, 0) + na
                for b, nb in items[i:]:
                    pair = f"{a},{b}"
                    self.element_gram[pair] = self.element_gram.get(pair, 0.0) + float(na * nb)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in vars(self)}


@dataclass
class DatasetStats:
    num_samples: int
    num_atoms: int
    energy_mean: float  # eV, of the training target energy
    energy_std: float  # eV
    forces_std: float  # eV/Å, RMS of the force components (mean 0)
    avg_num_nodes: float  # atoms per structure
    avg_degree: float | None  # neighbours per atom of the degree graph below; None if not measured
    degree_structures_atoms: int  # atoms in the subset avg_degree was measured on
    max_natoms: int
    degree_max_radius: float = DEGREE_RADIUS  # the graph avg_degree was measured on (Å) ...
    degree_max_neighbors: int = DEGREE_MAX_NEIGHBORS  # ... and its neighbour limit
    # least-squares per-element reference energies (eV) by atomic number, and the mean and std of the
    # residual energies E - sum ref[Z]; None where not measured (stats written before they were)
    energy_references: dict[int, float] | None = None
    referenced_energy_mean: float | None = None
    referenced_energy_std: float | None = None


def fit_element_references(gram: dict[str, float], energy: dict[str, float], atoms: dict[str, int], n: int,
                           mean: float, m2: float) -> tuple[dict[int, float], float, float]:
    """(references by atomic number, residual mean, residual std) of the least-squares fit from the
    normal equations' sums (`Accumulator`) over `n` structures whose energies have `mean` and sum of
    squared deviations `m2`."""
    elements = sorted(int(z) for z in atoms)
    index = {z: i for i, z in enumerate(elements)}
    g = np.zeros((len(elements), len(elements)))
    for pair, value in gram.items():
        a, b = (index[int(z)] for z in pair.split(","))
        g[a, b] = g[b, a] = value
    cte = np.array([energy[str(z)] for z in elements])
    counts = np.array([atoms[str(z)] for z in elements], dtype=np.float64)
    refs, *_ = np.linalg.lstsq(g, cte, rcond=None)  # minimum norm where the compositions are degenerate
    # residual sums from the normal equations: sum r = sum E - refs.counts;
    # sum r^2 = sum E^2 - 2 refs.(C^T E) + refs^T (C^T C) refs
    residual_sum = n * mean - refs @ counts
    residual_sq = (m2 + n * mean * mean) - 2.0 * refs @ cte + refs @ g @ refs
    residual_mean = residual_sum / n
    variance = max(residual_sq / n - residual_mean * residual_mean, 0.0)
    return {z: float(r) for z, r in zip(elements, refs)}, float(residual_mean), math.sqrt(variance)


def combine(shard_sums: list[dict], degree_graph: tuple[float, int] = DEGREE_GRAPH) -> DatasetStats:
    n = mean = m2 = 0.0
    for s in shard_sums:
        nb = s["n_energy"]
        if nb == 0:
            continue
        delta = s["energy_mean"] - mean
        total = n + nb
        mean += delta * nb / total
        m2 += s["energy_m2"] + delta * delta * n * nb / total
        n = total
    count = sum(s["count"] for s in shard_sums)
    atoms = sum(s["atoms"] for s in shard_sums)
    force_n = sum(s["force_n"] for s in shard_sums)
    d_atoms = sum(s["degree_atoms"] for s in shard_sums)
    refs, ref_mean, ref_std = None, None, None
    with_energy = [s for s in shard_sums if s["n_energy"]]
    if n > 0 and all("element_gram" in s for s in with_energy):  # older manifests lack the fit's sums
        gram, energy, counts = {}, {}, {}
        for s in with_energy:
            for total, part in ((gram, s["element_gram"]), (energy, s["element_energy"]), (counts, s["element_atoms"])):
                for key, value in part.items():
                    total[key] = total.get(key, 0) + value
        refs, ref_mean, ref_std = fit_element_references(gram, energy, counts, int(n), mean, m2)
    return DatasetStats(
        num_samples=count,
        num_atoms=atoms,
        energy_mean=mean,
        energy_std=math.sqrt(m2 / n) if n > 0 else 0.0,
        forces_std=math.sqrt(sum(s["force_sq"] for s in shard_sums) / force_n) if force_n else 0.0,
        avg_num_nodes=atoms / count if count else 0.0,
        avg_degree=sum(s["degree_edges"] for s in shard_sums) / d_atoms if d_atoms else None,
        degree_structures_atoms=d_atoms,
        max_natoms=max((s["max_natoms"] for s in shard_sums), default=0),
        degree_max_radius=float(degree_graph[0]),
        degree_max_neighbors=int(degree_graph[1]),
        energy_references=refs,
        referenced_energy_mean=ref_mean,
        referenced_energy_std=ref_std,
    )


def write_stats(stats: DatasetStats, path: str | Path) -> None:
    data = asdict(stats)
    data["degree_graph"] = {"max_radius": data.pop("degree_max_radius"),
                            "max_neighbors": data.pop("degree_max_neighbors")}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_stats(path: str | Path) -> DatasetStats:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset stats file not found: {path} (written by the eqv2 shard* verbs)")
    data = json.loads(path.read_text())
    graph = data.pop("degree_graph", None) or {}  # files without it were measured at 12 Å / 20
    if "force_rms" in data:  # files written before the normaliser took fairchem's name
        data.setdefault("forces_std", data.pop("force_rms"))
    if data.get("energy_references") is not None:  # JSON keys are strings
        data["energy_references"] = {int(z): float(v) for z, v in data["energy_references"].items()}
    try:
        return DatasetStats(**data, degree_max_radius=float(graph.get("max_radius", DEGREE_RADIUS)),
                            degree_max_neighbors=int(graph.get("max_neighbors", DEGREE_MAX_NEIGHBORS)))
    except TypeError as err:
        raise ValueError(f"{path}: not a dataset stats file: {err}") from err


def check_degree_graph(stats: DatasetStats, max_radius: float, max_neighbors: int, where: str,
                       manifest: str) -> None:
    """Raise ValueError unless avg_degree of `stats` (read from `where`, the stats of `manifest`) was
    measured on the model's graph."""
    remedy = (f"eqv2 stats {manifest} --max-radius {max_radius} --max-neighbors {max_neighbors} "
              f"--out {where}")
    if stats.avg_degree is None:
        raise ValueError(f"{where}: avg_degree was not measured (sharded with --degree-every 0); run {remedy}")
    if (abs(stats.degree_max_radius - max_radius) > 1e-9 or stats.degree_max_neighbors != max_neighbors):
        raise ValueError(
            f"{where}: avg_degree was measured on a {stats.degree_max_radius} Å / {stats.degree_max_neighbors}"
            f"-neighbour graph but the model uses {max_radius} Å / {max_neighbors} (model.max_radius / "
            f"model.max_neighbors); measure it on the model's graph with {remedy}, or set model.avg_degree "
            "and model_graph_stats_from_data: false")
