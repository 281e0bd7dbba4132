"""S2EF prediction files in fairchem's layout, and the OC20 evaluation server's submission file.

One split's predictions (`<dir>/<split>.npz`, as fairchem's trainer writes in predict mode):
    ids        [B] str      "<sid>_<fid>", sorted, each once
    energy     [B]          eV
    forces     [F, 3]       eV/Å of the free atoms only (the server does not score fixed ones), the
                            structures' blocks in the order of `ids`
    chunk_idx  [B - 1]      np.cumsum of each structure's free-atom count without the last: where
                            `np.split(forces, chunk_idx)` cuts
float16 by default (fairchem's `prediction_dtype` default; the server's files), float32 on request.

The submission (`eqv2 evaluate ... --submission FILE.npz`) joins the four OC20 splits, named `id`,
`ood_ads`, `ood_cat`, `ood_both`, as `<split>_<key>` in one compressed npz, the layout of fairchem's
`make_submission_file.py` for S2EF.

Every rank writes its own part; rank 0 merges them, so no rank gathers all predictions in memory
through the process group.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OC20_SPLITS = ("id", "ood_ads", "ood_cat", "ood_both")


class PredictionWriter:
    """Collects one rank's predictions of one split."""

    def __init__(self, dtype: str = "float16"):
        self.dtype = np.dtype(dtype)
        self.ids: list[str] = []
        self.energy: list[np.ndarray] = []
        self.forces: list[np.ndarray] = []

    def add(self, pred: dict[str, torch.Tensor], batch) -> None:
        energy = pred["energy"].detach().float().cpu().numpy()
        forces = pred["forces"].detach().float().cpu().numpy()
        fixed = batch.fixed.cpu().numpy() if batch.fixed is not None else np.zeros(len(forces), bool)
        counts = batch.natoms.cpu().tolist()
        start = 0
        for n in counts:
            free = ~fixed[start:start + n]
            self.forces.append(forces[start:start + n][free])
            start += n
        self.ids += list(batch.ids)
        self.energy.append(energy)

    def write_part(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = np.array([len(f) for f in self.forces], dtype=np.int64)
        np.savez(path, ids=np.array(self.ids, dtype=str),
                 energy=np.concatenate(self.energy) if self.energy else np.zeros(0, np.float32),
                 forces=np.concatenate(self.forces) if self.forces else np.zeros((0, 3), np.float32), sizes=sizes)

    @staticmethod
    def merge(parts: list[Path], out: Path, dtype: str) -> int:
        """Rank 0: join the ranks' parts into `out` (ids sorted, each once); returns the structure count."""
        ids, energy, blocks = [], [], []
        for part in parts:
            with np.load(part) as data:
                cuts = np.cumsum(data["sizes"])[:-1]
                ids += data["ids"].tolist()
                energy.append(data["energy"])
                blocks += np.split(data["forces"], cuts) if len(data["sizes"]) else []
        energy = np.concatenate(energy) if energy else np.zeros(0)
        _, order = np.unique(np.array(ids, dtype=str), return_index=True)  # sorted, duplicates dropped
        sizes = np.array([len(blocks[i]) for i in order], dtype=np.int64)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, ids=np.array(ids, dtype=str)[order], energy=energy[order].astype(dtype),
                            forces=(np.concatenate([blocks[i] for i in order]) if len(order) else
                                    np.zeros((0, 3))).astype(dtype),
                            chunk_idx=np.cumsum(sizes)[:-1])
        for part in parts:
            part.unlink()
        return len(order)


def write_submission(split_files: dict[str, Path], out: Path) -> None:
    """The evaluation server's S2EF file from the four OC20 split files (named as OC20_SPLITS)."""
    missing = [s for s in OC20_SPLITS if s not in split_files]
    if missing:
        raise ValueError(f"--submission needs the splits {', '.join(OC20_SPLITS)} (name them with --split "
                         f"id=... etc.); missing: {', '.join(missing)}")
    payload = {}
    for split in OC20_SPLITS:
        with np.load(split_files[split]) as data:
            for key in data.files:
                payload[f"{split}_{key}"] = data[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **payload)
