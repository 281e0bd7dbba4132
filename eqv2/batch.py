"""`AtomsBatch`: the tensors of a batch of structures, shared by the data pipeline and the model.

Structures are concatenated along the atom axis; `batch[i]` says which structure atom i belongs to.
Targets (`energy`, `forces`) and training masks (`fixed`, `tags`) are optional so that the same type
serves prediction.  So is the radius graph: the trainer's data-loader workers build it on the CPU
(integer edges and periodic images only; the model computes the edge vectors from the positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch


@dataclass
class AtomsBatch:
    pos: torch.Tensor  # [N, 3] float32, Å
    atomic_numbers: torch.Tensor  # [N] int64
    cell: torch.Tensor  # [B, 3, 3] float32, rows are lattice vectors, Å
    pbc: torch.Tensor  # [B, 3] bool
    natoms: torch.Tensor  # [B] int64
    batch: torch.Tensor  # [N] int64, structure index of each atom
    tags: torch.Tensor | None = None  # [N] int64: 0 subsurface, 1 surface, 2 adsorbate
    fixed: torch.Tensor | None = None  # [N] bool, True where the atom is held fixed
    energy: torch.Tensor | None = None  # [B] float32 target energy, eV
    forces: torch.Tensor | None = None  # [N, 3] float32 target forces, eV/Å
    stress: torch.Tensor | None = None  # [B, 3, 3] float32 target stress, eV/Å^3 (ASE's sign convention)
    ids: list[str] = field(default_factory=list)  # one id per structure, e.g. "<sid>_<fid>"
    # radius graph built ahead of the model (in the data-loader workers, `eqv2.model.graph.GraphBuilder`);
    # None: the model builds it from the positions
    edge_index: torch.Tensor | None = None  # [2, E] int64 (source j, target i)
    cell_offset: torch.Tensor | None = None  # [E, 3] int64 periodic image of each edge's source
    # (max_radius, max_neighbors, max_num_elements, enforce_max_neighbors_strictly) the graph was built and
    # the atoms checked with
    graph_spec: tuple[float, int, int, bool] | None = None

    @property
    def num_graphs(self) -> int:
        return int(self.natoms.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AtomsBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return replace(self, **moved)

    def pin_memory(self) -> "AtomsBatch":
        """The batch with its tensors in page-locked host memory (the DataLoader's pinning thread calls
        this on a GPU machine), so that `to(device, non_blocking=True)` copies without blocking the host."""
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **pinned)

    @classmethod
    def from_arrays(
        cls,
        structures: list[dict[str, np.ndarray]],
        ids: list[str] | None = None,
        float_dtype: torch.dtype = torch.float32,
    ) -> "AtomsBatch":
        """Concatenate per-structure arrays.

        Each dict holds `positions` [n,3], `numbers` [n], `cell` [3,3], `pbc` [3] and optionally
        `tags` [n], `fixed` [n], `energy` (scalar), `forces` [n,3], `stress` [3,3].  Positions and cells are
        float32 unless `float_dtype` says otherwise (float64 for exactness tests).
        """
        if not structures:
            raise ValueError("cannot build a batch from zero structures")
        natoms = [len(s["numbers"]) for s in structures]
        cat = lambda k, dt: torch.as_tensor(np.concatenate([np.asarray(s[k]) for s in structures]), dtype=dt)
        stack = lambda k, dt: torch.as_tensor(np.stack([np.asarray(s[k]) for s in structures]), dtype=dt)
        has = lambda k: all(s.get(k) is not None for s in structures)
        return cls(
            pos=cat("positions", float_dtype).reshape(-1, 3),
            atomic_numbers=cat("numbers", torch.int64),
            cell=stack("cell", float_dtype).reshape(-1, 3, 3),
            pbc=stack("pbc", torch.bool).reshape(-1, 3),
            natoms=torch.as_tensor(natoms, dtype=torch.int64),
            batch=torch.repeat_interleave(torch.arange(len(natoms)), torch.as_tensor(natoms)),
            tags=cat("tags", torch.int64) if has("tags") else None,
            fixed=cat("fixed", torch.bool) if has("fixed") else None,
            energy=torch.as_tensor([float(s["energy"]) for s in structures], dtype=torch.float32)
            if has("energy")
            else None,
            forces=cat("forces", torch.float32).reshape(-1, 3) if has("forces") else None,
            stress=stack("stress", torch.float32).reshape(-1, 3, 3) if has("stress") else None,
            ids=list(ids) if ids is not None else [str(i) for i in range(len(natoms))],
        )
