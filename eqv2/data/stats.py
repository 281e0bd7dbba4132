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
"""
from __future__ import annotations

import json
import math
import zlib
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
