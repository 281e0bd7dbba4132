"""`AtomsBatch`: the tensors of a batch of structures, shared by the data pipeline and the model.

Structures are concatenated along the atom axis; `batch[i]` says which structure atom i belongs to.
Targets (`energy`, `forces`) and training masks (`fixed`, `tags`) are optional so that the same type
serves prediction.  So is the radius graph: the trainer's data-loader workers build it on the CPU
(integer edges and periodic images only; the model computes the edge vectors from the positions).

Under an execution plan with shape buckets a batch also carries its `bucket`: the same structures followed by
an inert dummy structure, padded to the plan's multiples of atoms and edges (`eqv2.buckets.pad_to_bucket`,
built where the batch is built: in the loader workers for training).  The model runs on the bucket and its
outputs are narrowed back to the real structures (eqv2/buckets.py); everything else (loss, metrics) reads the
batch's own fields, which hold the real structures only.  The batch's model inputs (`BUCKET_VIEWS`) are views
of the bucket's tensors, so moving, pinning or pickling the batch moves each tensor once, and a batch given
other model inputs (`dataclasses.replace(batch, pos=...)`) drops a bucket that no longer matches them.
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
    # these structures padded to a shape bucket (module docstring); None: not padded
    bucket: AtomsBatch | None = None
    padding: int = 0  # on a bucket: its last `padding` atoms are padding (its last structure, the inert dummy)

    def __post_init__(self) -> None:
        if self.bucket is not None and not self._views_of(self.bucket):
            self.bucket = None  # model inputs replaced since the bucket was built: it is stale

    def _views_of(self, bucket: AtomsBatch) -> bool:
        """Whether this batch's model inputs are the leading parts of `bucket`'s (host-side checks only)."""
        if torch.compiler.is_compiling():  # traced tensors have no data pointers: the bucket is taken as built
            return True
        if bucket.padding < 1 or bucket.natoms.shape[0] != self.natoms.shape[0] + 1 \
                or bucket.pos.shape[0] != self.pos.shape[0] + bucket.padding:
            return False
        for name in BUCKET_VIEWS:
            mine, theirs = getattr(self, name), getattr(bucket, name)
            if mine is None or theirs is None:
                return False
            dim = 1 if name == "edge_index" else 0
            if (mine.data_ptr() != theirs.data_ptr() or mine.dtype != theirs.dtype or mine.device != theirs.device
                    or mine.stride() != theirs.stride() or mine.dim() != theirs.dim()
                    or mine.shape[dim] > theirs.shape[dim]
                    or any(a != b for i, (a, b) in enumerate(zip(mine.shape, theirs.shape)) if i != dim)):
                return False
        return True

    def with_bucket(self, bucket: AtomsBatch) -> AtomsBatch:
        """This batch carrying `bucket` (its structures padded, `eqv2.buckets.pad_to_bucket`), its model inputs
        replaced by the leading parts of the bucket's (same values)."""
        return replace(self, **_views(bucket, self._sizes()), bucket=bucket)

    @property
    def num_graphs(self) -> int:
        return int(self.natoms.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AtomsBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "AtomsBatch":
        """The batch with its tensors in page-locked host memory (the DataLoader's pinning thread calls
        this on a GPU machine), so that `to(device, non_blocking=True)` copies without blocking the host."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "AtomsBatch":
        """The batch with `fn` applied to each tensor once: a bucket's, then the batch's own tensors that are
        not views of the bucket's (those are taken from the mapped bucket)."""
        bucket = self.bucket._map(fn) if self.bucket is not None else None
        shared = BUCKET_VIEWS if bucket is not None else ()
        mapped = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                  if f.name not in shared and isinstance(getattr(self, f.name), torch.Tensor)}
        if bucket is not None:
            mapped.update(_views(bucket, self._sizes()), bucket=bucket)
        return replace(self, **mapped)

    def _sizes(self) -> dict[str, int]:
        return {"atoms": self.pos.shape[0], "graphs": self.natoms.shape[0],
                "edges": self.edge_index.shape[1] if self.edge_index is not None else -1}

    def __getstate__(self) -> dict:
        """Pickled (e.g. from a loader worker) with a bucket: the bucket's tensors once, the views rebuilt."""
        state = dict(self.__dict__)
        if self.bucket is not None:
            state.update({name: None for name in BUCKET_VIEWS}, _sizes=self._sizes())
        return state

    def __setstate__(self, state: dict) -> None:
        sizes = state.pop("_sizes", None)
        self.__dict__.update(state)
        if sizes is not None:
            self.__dict__.update(_views(self.bucket, sizes))

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


# the model inputs of a batch with a bucket: views of the leading atoms, structures or edges of the bucket's
BUCKET_VIEWS = ("pos", "atomic_numbers", "batch", "cell", "pbc", "natoms", "edge_index", "cell_offset")


def _views(bucket: AtomsBatch, sizes: dict[str, int]) -> dict[str, torch.Tensor | None]:
    """The leading `sizes` (atoms, graphs, edges; edges -1: no graph) of the bucket's model inputs."""
    atoms, graphs, edges = sizes["atoms"], sizes["graphs"], sizes["edges"]
    per = {"pos": atoms, "atomic_numbers": atoms, "batch": atoms, "cell": graphs, "pbc": graphs, "natoms": graphs,
           "cell_offset": edges}
    views = {name: getattr(bucket, name).narrow(0, 0, n) if n >= 0 else None for name, n in per.items()}
    views["edge_index"] = bucket.edge_index.narrow(1, 0, edges) if edges >= 0 else None
    return views
